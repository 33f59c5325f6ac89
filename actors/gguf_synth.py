"""Synthesise small llama-architecture GGUF models for tests, demos and benchmarks.

The models have random weights and a byte-level SentencePiece ("llama") vocabulary: `<unk>`,
`<s>`, `</s>`, two ChatML control tokens, the 256 byte tokens `<0x00>`..`<0xFF>` and `▁` (the
SentencePiece space). Every token except the printable ASCII bytes gets an all-zero row in
`output.weight`, so greedy decoding emits printable ASCII only and never ends early: its output is
a deterministic function of the prompt and runs to `max_tokens`, which lets tests compare the
node's text with llama.cpp's own byte for byte.

Run `python -m actors.gguf_synth OUT --size tiny` to write one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Dtype = Literal["f32", "f16", "q8_0", "q4_0"]
DTYPES: tuple[Dtype, ...] = ("f32", "f16", "q8_0", "q4_0")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Token types as llama.cpp reads them (gguf.TokenType); spelled out so the vocabulary is visible.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIALS: tuple[tuple[str, int], ...] = (
    ("<unk>", _UNKNOWN),
    ("<s>", _CONTROL),
    ("</s>", _CONTROL),
    ("<|im_start|>", _CONTROL),
    ("<|im_end|>", _CONTROL),
)
BYTE_BASE = len(_SPECIALS)  # token id of <0x00>
N_VOCAB = BYTE_BASE + 256 + 1  # the specials, the bytes, "▁"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The architecture of a synthetic model; every size is a count of elements."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int

    def n_params(self) -> int:
        """Count the parameters, embeddings and output head included."""
        head_dim = self.n_embd // self.n_head
        n_embd_kv = head_dim * self.n_head_kv
        attn = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * n_embd_kv
        ffn = 3 * self.n_embd * self.n_ff
        per_layer = attn + ffn + 2 * self.n_embd
        return self.n_layer * per_layer + 2 * N_VOCAB * self.n_embd + self.n_embd


# Presets: "tiny" (~0.1M params) loads in milliseconds for unit tests; "small" (~2.4M) and
# "medium50m" (~51M) give the memory estimate and the benchmark sizes where weights dominate.
SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128),
    "small": ModelShape(n_layer=4, n_embd=256, n_head=8, n_head_kv=4, n_ff=512),
    "medium50m": ModelShape(n_layer=16, n_embd=512, n_head=8, n_head_kv=8, n_ff=1408),
}


def _vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = [text for text, _ in _SPECIALS]
    types = [kind for _, kind in _SPECIALS]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    tokens.append("\u2581")
    types.append(_NORMAL)
    scores = [0.0] * len(tokens)
    return tokens, types, scores


def printable_token_ids() -> list[int]:
    """Return the ids of the byte tokens for printable ASCII (0x20..0x7E): all greedy can emit."""
    return [BYTE_BASE + b for b in range(0x20, 0x7F)]


def _encode(array: np.ndarray, dtype: Dtype) -> tuple[np.ndarray, object | None]:
    """Convert a float32 weight matrix to the file's dtype; return (data, raw gguf dtype)."""
    import gguf

    if dtype == "f32":
        return array.astype(np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    quant = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    return gguf.quants.quantize(array.astype(np.float32), quant), quant


def write_llama_gguf(
    path: str | Path,
    *,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    n_ctx_train: int = 2048,
    seed: int = 0,
    dtype: Dtype = "f32",
    chat_template: bool = True,
    name: str = "moc-synthetic",
) -> Path:
    """Write a random llama-architecture GGUF with a byte vocabulary to `path` and return it.

    Matrices are stored in `dtype` (q8_0 and q4_0 need every row length divisible by 32); norms
    stay f32 as llama.cpp requires.
    """
    import gguf

    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(N_VOCAB)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[dtype]
    writer.add_file_type(file_type)

    tokens, types, scores = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # No implicit leading space: the prompt's bytes are exactly what the client sent.
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(CHATML_TEMPLATE)

    def matrix(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype(np.float32)

    def add(name_: str, array: np.ndarray) -> None:
        if array.ndim == 1:
            writer.add_tensor(name_, array.astype(np.float32))
            return
        data, raw = _encode(array, dtype)
        if raw is None:
            writer.add_tensor(name_, data)
        else:
            writer.add_tensor(name_, data, raw_dtype=raw)  # type: ignore[arg-type]

    ones = np.ones(n_embd, dtype=np.float32)
    add("token_embd.weight", matrix(N_VOCAB, n_embd, 1.0))
    for i in range(n_layer):
        add(f"blk.{i}.attn_norm.weight", ones)
        add(f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd, n_embd**-0.5))
        add(f"blk.{i}.attn_k.weight", matrix(n_embd_kv, n_embd, n_embd**-0.5))
        add(f"blk.{i}.attn_v.weight", matrix(n_embd_kv, n_embd, n_embd**-0.5))
        add(f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd, n_embd**-0.5))
        add(f"blk.{i}.ffn_norm.weight", ones)
        add(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd, n_embd**-0.5))
        add(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd, n_embd**-0.5))
        add(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff, n_ff**-0.5))
    add("output_norm.weight", ones)
    head = np.zeros((N_VOCAB, n_embd), dtype=np.float32)
    printable = printable_token_ids()
    # Large enough logits that sampling at temperature ~1 is not uniform noise.
    head[printable] = matrix(len(printable), n_embd, 4.0 * n_embd**-0.5)
    add("output.weight", head)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_preset(
    path: str | Path, size: str, *, seed: int = 0, dtype: Dtype = "f32", chat_template: bool = True
) -> Path:
    """Write the preset `size` (a key of SIZES) to `path` (`chat_template` False: without
    tokenizer.chat_template, as many base models ship)."""
    shape = SIZES[size]
    return write_llama_gguf(
        path,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        n_head_kv=shape.n_head_kv,
        n_ff=shape.n_ff,
        seed=seed,
        dtype=dtype,
        name=f"moc-synthetic-{size}",
        chat_template=chat_template,
    )


def main(argv: list[str] | None = None) -> int:
    """Write one synthetic model from the command line."""
    parser = argparse.ArgumentParser(description="Write a synthetic llama GGUF model.")
    parser.add_argument("out", type=Path, help="file to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--dtype", choices=DTYPES, default="f32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_preset(args.out, args.size, seed=args.seed, dtype=args.dtype)
    print(f"wrote {path} ({SIZES[args.size].n_params():,} parameters, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
