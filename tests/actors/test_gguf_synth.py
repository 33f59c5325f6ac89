"""Synthetic GGUF models: llama.cpp loads them, and greedy decoding emits printable ASCII only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from actors.gguf_synth import N_VOCAB, SIZES, main, write_llama_gguf
from actors.serving.estimate import read_gguf_header
from actors.worker.backends.gguf import open_llama


def load(path: Path, n_ctx: int = 256) -> Any:
    # As the GGUF backend loads by default: a repacked q8_0 crashes llama.cpp's AMX matmul.
    kwargs = {"model_path": str(path), "n_ctx": n_ctx, "n_threads": 1, "verbose": False}
    return open_llama(llama_cpp, kwargs, cpu_repack=False)


def test_the_tiny_model_loads_in_llama_cpp_with_its_byte_vocabulary(tiny_gguf: Path) -> None:
    llm = load(tiny_gguf)
    try:
        assert llm.n_vocab() == N_VOCAB
        assert llm.metadata["general.architecture"] == "llama"
        assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
        text = "Hi, GGUF! \u00e9"
        tokens = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(tokens).decode() == text
    finally:
        llm.close()


def test_greedy_decoding_runs_to_max_tokens_in_printable_ascii(tiny_gguf: Path) -> None:
    llm = load(tiny_gguf)
    try:
        out = llm.create_completion("Once upon a time", max_tokens=64, temperature=0.0)
    finally:
        llm.close()
    text = out["choices"][0]["text"]
    assert out["choices"][0]["finish_reason"] == "length"
    assert len(text) == 64
    assert all(0x20 <= ord(c) < 0x7F for c in text)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_half_and_quantized_models_load_and_generate(tmp_path: Path, dtype: str) -> None:
    path = write_llama_gguf(
        tmp_path / f"m-{dtype}.gguf",
        n_layer=1,
        n_embd=64,
        n_head=2,
        n_head_kv=2,
        n_ff=96,
        dtype=dtype,  # type: ignore[arg-type]
    )
    llm = load(path)
    try:
        out = llm.create_completion("abc", max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    assert len(out["choices"][0]["text"]) == 8


def test_file_size_follows_the_parameter_count(tiny_gguf: Path, small_gguf: Path) -> None:
    for path, size in ((tiny_gguf, "tiny"), (small_gguf, "small")):
        weights = sum(read_gguf_header(path).tensors.values())
        assert weights == 4 * SIZES[size].n_params()  # f32 everywhere
        assert path.stat().st_size > weights


def test_the_medium_preset_has_about_fifty_million_parameters() -> None:
    assert 45e6 < SIZES["medium50m"].n_params() < 55e6


def test_bad_shapes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="divide"):
        write_llama_gguf(tmp_path / "x.gguf", n_layer=1, n_embd=30, n_head=4, n_head_kv=4, n_ff=8)


def test_the_command_line_writes_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo" / "tiny.gguf"
    assert main([str(out), "--size", "tiny", "--dtype", "f16"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert "parameters" in capsys.readouterr().out
