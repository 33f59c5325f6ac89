"""What a JSON-schema grammar costs a GGUF request per token, on realistic vocabulary sizes.

The test models' byte vocabulary (262 tokens) hides the grammar's cost, which grows with the
vocabulary: this writes 2-layer random llama models with 32k and 128k-token vocabularies
(random 2-6 character pieces beside the byte tokens), runs greedy and seeded requests through
the batching engine with and without `json_schema`, and prints ms per generated token and the
ratio. Run: `python -m bench.grammar [--quick]` (--quick: the 32k model, 16 tokens).
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from actors.gguf_synth import _BYTE, _NORMAL, _SPECIALS
from actors.types import GenerationParams
from actors.worker.backends.gguf_engine import Finish, GgufEngine
from actors.worker.protocol import LoadSpec

SCHEMA = json.dumps(
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
)


def write_model(path: Path, n_vocab: int, n_embd: int = 64, seed: int = 0) -> Path:
    """Write a 2-layer random llama GGUF with an `n_vocab`-token SentencePiece vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = [t for t, _ in _SPECIALS] + [f"<0x{b:02X}>" for b in range(256)]
    types = [k for _, k in _SPECIALS] + [_BYTE] * 256
    seen = set(tokens)
    letters = list(string.ascii_lowercase + ' {}":,0123456789')
    while len(tokens) < n_vocab:
        piece = "".join(rng.choice(letters, size=int(rng.integers(2, 7)))).replace(" ", "\u2581")
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(_NORMAL)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("grammar-bench")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * n_vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float32)

    ones = np.ones(n_embd, dtype=np.float32)
    kv = n_embd // 2
    w.add_tensor("token_embd.weight", matrix(n_vocab, n_embd, 1.0))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd, n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv, n_embd, n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv, n_embd, n_embd**-0.5))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd, n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(128, n_embd, n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(128, n_embd, n_embd**-0.5))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, 128, 128**-0.5))
    w.add_tensor("output_norm.weight", ones)
    head = matrix(n_vocab, n_embd, 4.0 * n_embd**-0.5)
    head[: len(_SPECIALS)] = 0.0  # the specials: EOS only where the grammar leaves nothing else
    w.add_tensor("output.weight", head)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def ms_per_token(engine: GgufEngine, params: GenerationParams, runs: int) -> float:
    """Return the best of `runs` requests' milliseconds per generated token."""
    best = float("inf")
    for i in range(runs):
        ended: list[Finish] = []
        prompt = f"{i} {params.temperature} {params.json_schema is not None}"  # few tokens
        engine.submit(prompt, params, emit=lambda _: None, done=ended.append)
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        best = min(best, (time.perf_counter() - start) * 1000 / max(1, ended[0].tokens_generated))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 32k model, 16 tokens")
    args = parser.parse_args(argv)
    sizes, max_tokens = ((32_000,), 16) if args.quick else ((32_000, 128_000), 64)
    with tempfile.TemporaryDirectory() as tmp:
        for n_vocab in sizes:
            path = write_model(Path(tmp) / f"v{n_vocab}.gguf", n_vocab)
            spec = LoadSpec(backend="gguf", path=str(path), n_ctx=512, n_threads=1)
            engine = GgufEngine.load(spec, parallel=1)
            try:
                for temperature in (0.0, 0.8):
                    free = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=1)
                    plain = ms_per_token(engine, free, 3)
                    schema = ms_per_token(engine, replace(free, json_schema=SCHEMA), 3)
                    print(
                        json.dumps(
                            {
                                "n_vocab": n_vocab,
                                "temperature": temperature,
                                "ms_per_token": round(plain, 3),
                                "ms_per_token_json_schema": round(schema, 3),
                                "ratio": round(schema / plain, 2),
                            }
                        ),
                        flush=True,
                    )
            finally:
                engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
