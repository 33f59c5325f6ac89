"""Scoring through llama.cpp on generated GGUF models: the loss matches llama.cpp's own token
log-probabilities, windows and budgets behave, and a LoRA candidate rides on its base."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from actors.gguf_synth import SIZES
from actors.goals.evalset import EvalRecord
from actors.goals.scoring import gguf_type, score_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


def _llama_logprob_loss(path: Path, text: str) -> tuple[float, int]:
    """Return llama-cpp-python's own mean -logprob of the text's tokens (echo=True)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False)
    try:
        out = llm.create_completion(text, max_tokens=1, echo=True, logprobs=1, temperature=0)
    finally:
        llm.close()
    logprobs = out["choices"][0]["logprobs"]["token_logprobs"]  # type: ignore[index]
    # [None (BOS), text tokens 2.., the one generated token]: keep the text tokens.
    scored = [float(lp) for lp in logprobs[1:-1] if lp is not None]
    return -sum(scored) / len(scored), len(scored)


def test_the_loss_matches_llama_cpps_own_token_log_probabilities(tiny_gguf: Path) -> None:
    # llama-cpp-python's echo leaves out the first text token's log-probability (given BOS), so
    # the first character is made the prompt here: both then score the same tokens.
    ours = score_model(str(tiny_gguf), [EvalRecord(TEXT[0], TEXT[1:])], n_ctx=512)
    theirs, count = _llama_logprob_loss(tiny_gguf, TEXT)
    assert ours["tokens"] == count
    assert ours["loss"] == pytest.approx(theirs, rel=1e-4)
    assert ours["perplexity"] == pytest.approx(math.exp(ours["loss"]))


def test_long_texts_are_scored_in_windows_that_cover_every_token_once(tiny_gguf: Path) -> None:
    long_text = TEXT * 2  # ~360 tokens, past a 64-token window
    whole = score_model(str(tiny_gguf), [EvalRecord("", long_text)], n_ctx=512)
    windowed = score_model(str(tiny_gguf), [EvalRecord("", long_text)], n_ctx=64)
    assert windowed["tokens"] == whole["tokens"] > 64
    assert math.isfinite(windowed["loss"])
    assert windowed["loss"] != whole["loss"]  # shorter context, other predictions


def test_only_completion_tokens_are_scored_and_the_budget_is_kept(tiny_gguf: Path) -> None:
    record = EvalRecord("Question: what?\nAnswer:", " nothing at all")
    with_prompt = score_model(str(tiny_gguf), [record], n_ctx=512)
    alone = score_model(str(tiny_gguf), [EvalRecord("", record.prompt + record.completion)])
    assert 0 < with_prompt["tokens"] < alone["tokens"]
    capped = score_model(str(tiny_gguf), [EvalRecord("", TEXT)] * 3, max_tokens=50)
    assert capped["tokens"] == 50


def test_a_set_without_scorable_tokens_is_an_error(tiny_gguf: Path) -> None:
    with pytest.raises(ValueError, match="no tokens to score"):
        score_model(str(tiny_gguf), [EvalRecord("everything is prompt", "")])


def _zero_lora(path: Path, rank: int = 4) -> Path:
    """Write a LoRA adapter for the tiny preset whose B matrices are zero (changes nothing)."""
    import gguf

    shape = SIZES["tiny"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    rng = np.random.default_rng(0)
    for layer in range(shape.n_layer):
        name = f"blk.{layer}.attn_q.weight"
        a = rng.standard_normal((rank, shape.n_embd)).astype(np.float32)
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", np.zeros((shape.n_embd, rank), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_lora_adapter_is_recognised_and_scored_on_top_of_its_base(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    adapter = _zero_lora(tmp_path / "zero-lora.gguf")
    assert gguf_type(adapter) == "adapter"
    assert gguf_type(tiny_gguf) == "model"
    records = [EvalRecord("", TEXT)]
    base = score_model(str(tiny_gguf), records)
    with_adapter = score_model(str(tiny_gguf), records, lora_path=str(adapter))
    assert with_adapter["tokens"] == base["tokens"]
    assert with_adapter["loss"] == pytest.approx(base["loss"], rel=1e-5)
