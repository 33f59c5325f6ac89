"""Read a llama-architecture GGUF: its hyperparameters and its tensors as float32 arrays.

Tensors come back in numpy order (rows = output features), which is what `torch.nn.functional
.linear` expects: GGUF stores ggml `ne = [in, out]`, numpy sees `(out, in)`. Q and K weights are
kept as GGUF lays them out (llama.cpp's converter permutes them for its "normal" RoPE, which
rotates adjacent pairs), so the torch model applies that RoPE and no permutation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.learning.errors import UnsupportedModel

# Types we can dequantize exactly (gguf.GGMLQuantizationType values): F32, F16, Q8_0, BF16.
SUPPORTED_TYPES = {0: "f32", 1: "f16", 8: "q8_0", 30: "bf16"}
_ARCHS = ("llama",)


@dataclass(frozen=True, slots=True)
class LlamaParams:
    """The hyperparameters the forward pass needs, read from the GGUF metadata."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    n_ctx_train: int

    @property
    def head_dim(self) -> int:
        """Return the width of one attention head."""
        return self.n_embd // self.n_head


@dataclass(frozen=True, slots=True)
class GgufWeights:
    """A model's hyperparameters, its float32 tensors and each tensor's stored type name."""

    params: LlamaParams
    tensors: dict[str, np.ndarray]
    types: dict[str, str]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise UnsupportedModel(f"the GGUF has no {key} key")
        return default
    return field.contents()


def _size(reader: Any, key: str, default: Any = None) -> int:
    """Read a size: a whole number of at least 1 (a head count of 0 would divide by zero)."""
    value = _field(reader, key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
        raise UnsupportedModel(f"the GGUF's {key} is {value!r}; it must be a number >= 1")
    return int(value)


def read_params(reader: Any) -> LlamaParams:
    """Read the llama hyperparameters from an open gguf.GGUFReader."""
    arch = str(_field(reader, "general.architecture"))
    if arch not in _ARCHS:
        raise UnsupportedModel(
            f"architecture {arch!r} is not supported for training (supported: {', '.join(_ARCHS)})"
        )
    n_embd = _size(reader, f"{arch}.embedding_length")
    n_head = _size(reader, f"{arch}.attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab_default = len(tokens.data) if tokens is not None else 0
    return LlamaParams(
        arch=arch,
        n_layer=_size(reader, f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_size(reader, f"{arch}.attention.head_count_kv", n_head),
        n_ff=_size(reader, f"{arch}.feed_forward_length"),
        n_vocab=_size(reader, f"{arch}.vocab_size", n_vocab_default),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_dim=int(_field(reader, f"{arch}.rope.dimension_count", n_embd // n_head)),
        n_ctx_train=int(_field(reader, f"{arch}.context_length", 2048)),
    )


def dequantize(name: str, raw: Any, type_id: int) -> np.ndarray:
    """Return tensor `name` as float32, or raise UnsupportedModel naming its type."""
    import gguf

    if type_id not in SUPPORTED_TYPES:
        try:
            type_name = gguf.GGMLQuantizationType(type_id).name
        except ValueError:
            type_name = str(type_id)
        raise UnsupportedModel(
            f"tensor {name} is stored as {type_name}; training reads only "
            f"{', '.join(SUPPORTED_TYPES.values())} (requantize the model to one of them)"
        )
    if type_id == 0:
        return np.array(raw, dtype=np.float32)
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(type_id)), np.float32)


def read_gguf(path: str | Path) -> GgufWeights:
    """Read a llama GGUF's hyperparameters and dequantize every tensor to float32."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"cannot read GGUF {path}: {exc}") from exc
    params = read_params(reader)
    tensors: dict[str, np.ndarray] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        type_id = int(t.tensor_type)
        tensors[t.name] = dequantize(t.name, t.data, type_id)
        types[t.name] = SUPPORTED_TYPES[type_id]
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in tensors]
    if missing:
        raise UnsupportedModel(f"{path} lacks tensors {', '.join(missing)}")
    return GgufWeights(params, tensors, types)
