"""Reading GGUF tensors: f32, f16 and q8_0 dequantized; other types refused by name."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from actors.gguf_synth import write_preset
from actors.learning.errors import UnsupportedModel
from actors.learning.gguf_io import read_gguf, read_params


@pytest.mark.parametrize(("dtype", "tol"), [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)], ids=str)
def test_each_supported_type_reads_back_close_to_the_f32_weights(
    tmp_path: Path, dtype: str, tol: float
) -> None:
    ref = read_gguf(write_preset(tmp_path / "a.gguf", "tiny", seed=5, dtype="f32"))
    got = read_gguf(write_preset(tmp_path / "b.gguf", "tiny", seed=5, dtype=dtype))  # type: ignore[arg-type]
    assert got.params == ref.params
    assert got.params.n_head_kv == 2 and got.params.rms_eps == pytest.approx(1e-5)
    for name, arr in ref.tensors.items():
        assert got.tensors[name].shape == arr.shape
        scale = max(float(np.abs(arr).max()), 1e-6)
        assert float(np.abs(got.tensors[name] - arr).max()) <= tol * scale, name
    assert got.types["blk.0.attn_q.weight"] == dtype
    assert got.types["blk.0.attn_norm.weight"] == "f32"


def test_a_tensor_in_an_unsupported_type_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "q4.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in (("embedding_length", 32), ("block_count", 1), ("feed_forward_length", 32)):
        w.add_uint32(f"llama.{key}", val)
    w.add_uint32("llama.attention.head_count", 2)
    w.add_uint32("llama.vocab_size", 8)
    q = gguf.GGMLQuantizationType.Q4_0
    w.add_tensor(
        "token_embd.weight", gguf.quants.quantize(np.ones((8, 32), np.float32), q), raw_dtype=q
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="token_embd.weight is stored as Q4_0"):
        read_gguf(path)


def test_an_architecture_other_than_llama_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2' is not supported"):
        read_gguf(path)


@pytest.mark.parametrize("key", ["attention.head_count", "embedding_length", "block_count"])
def test_a_zero_size_is_refused_as_unsupported_not_a_division_by_zero(
    tmp_path: Path, key: str
) -> None:
    path = tmp_path / "zero.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    sizes = {
        "block_count": 1,
        "embedding_length": 64,
        "attention.head_count": 4,
        "feed_forward_length": 128,
        "vocab_size": 256,
    }
    for name, value in {**sizes, key: 0}.items():
        writer.add_uint32(f"llama.{name}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match=f"llama.{key} is 0"):
        read_params(gguf.GGUFReader(str(path)))
