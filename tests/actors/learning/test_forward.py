"""The torch forward pass against llama.cpp's own logits, and tokenizing through llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import torch

from actors.gguf_synth import write_preset
from actors.learning.llama_torch import load_llama
from actors.learning.tokenizer import Tokenizer
from actors.worker.backends.gguf import open_llama

PROMPT = "Hello there, how are you doing today? The quick brown fox."
F32 = 0  # GGML_TYPE_F32, for a KV cache without f16 rounding


def llama_logits(
    path: Path, ids: list[int], *, kv_f32: bool, lora: Path | None = None
) -> np.ndarray:
    """Return llama.cpp's logits at every position of `ids`, loaded as workers load models."""
    kw = {"type_k": F32, "type_v": F32} if kv_f32 else {}
    llm = served(
        path, logits_all=True, n_ctx=128, lora_path=str(lora) if lora else None, **kw
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def served(path: Path, **kwargs: object) -> Any:
    """Load `path` in llama.cpp as the GGUF backend does by default: no CPU weight repacking
    (repacked q8_0 crashes in llama.cpp's AMX matmul on Xeons with AMX)."""
    return open_llama(llama_cpp, {"model_path": str(path), "verbose": False, **kwargs}, cpu_repack=False)


def torch_logits(model: object, ids: list[int], kv: str) -> np.ndarray:
    model.emulate = True  # type: ignore[attr-defined]
    model.kv_type = kv  # type: ignore[attr-defined]
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()  # type: ignore[operator,no-any-return]


def test_the_tokenizer_is_the_models_own_through_llama_cpp(tiny_gguf: Path) -> None:
    tok = Tokenizer(tiny_gguf)
    llm = llama_cpp.Llama(model_path=str(tiny_gguf), vocab_only=True, verbose=False)
    ids = tok.encode(PROMPT, bos=True)
    assert ids == llm.tokenize(PROMPT.encode(), add_bos=True, special=True)
    assert ids[0] == tok.bos == 1
    assert tok.decode(ids[1:]) == PROMPT
    assert tok.encode("<|im_start|>x")[0] == 3  # special tokens parse as themselves


def test_torch_logits_match_llama_cpp_on_an_f32_model(tiny_gguf: Path) -> None:
    model = load_llama(tiny_gguf)
    ids = Tokenizer(tiny_gguf).encode(PROMPT, bos=True)
    exact = np.abs(torch_logits(model, ids, "f32") - llama_logits(tiny_gguf, ids, kv_f32=True))
    # With an f32 KV cache only the summation order differs: ~1e-6 on logits of size ~14.
    assert exact.max() < 1e-4
    served = np.abs(torch_logits(model, ids, "f16") - llama_logits(tiny_gguf, ids, kv_f32=False))
    # The default f16 KV cache: a K or V element on an f16 rounding boundary can round the other
    # way (one f16 ulp, ~1e-3 relative), so the bound is looser but still far below the logits.
    assert served.max() < 5e-3


def test_torch_logits_match_llama_cpp_on_a_q8_0_model(tmp_path: Path) -> None:
    path = write_preset(tmp_path / "q8.gguf", "tiny", seed=3, dtype="q8_0")
    model = load_llama(path)
    ids = Tokenizer(path).encode(PROMPT, bos=True)
    ref = llama_logits(path, ids, kv_f32=False)
    # Activations are quantized to q8_0 as ggml does, so the integer dot products agree
    # exactly, until a summation-order difference moves an activation across a q8 rounding
    # boundary (one step is ~1% of its block's largest value): then the positions after it
    # differ by up to ~1% of the logit range. Bounds: 2% of the range at worst, 0.1% on average.
    diff = np.abs(torch_logits(model, ids, "f16") - ref)
    scale = float(np.abs(ref).max())
    assert diff.max() < 0.02 * scale
    assert diff.mean() < 1e-3 * scale


def test_greedy_continuations_agree_with_llama_cpp(tiny_gguf: Path) -> None:
    model = load_llama(tiny_gguf)
    model.emulate = True
    ids = Tokenizer(tiny_gguf).encode(PROMPT, bos=True)
    llm = served(tiny_gguf, n_ctx=128)
    ref = [t for _, t in zip(range(32), llm.generate(ids, temp=0.0), strict=False)]
    assert model.greedy(ids, 32) == ref
