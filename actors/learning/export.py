"""Write training results as GGUF files llama.cpp loads.

- A LoRA adapter: `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`,
  the base's `general.architecture`, and per adapted weight `<name>.lora_a` with ggml shape
  `[n_in, rank]` (numpy (rank, n_in)) and `<name>.lora_b` with `[rank, n_out]` (numpy
  (n_out, rank)), as llama.cpp's `llama_adapter_lora_init` checks them.
- A whole model: the base file's metadata copied key by key, every tensor replaced, each stored
  in the base's type (f32, f16, q8_0; bf16 is written as f16) so the result is as compact as
  the base.

Files are written to a temporary name and renamed, so a crash never leaves half a model that a
later load would trip over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from actors.learning.gguf_io import SUPPORTED_TYPES


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_lora_adapter(
    path: str | Path,
    *,
    arch: str,
    alpha: float,
    tensors: dict[str, tuple[np.ndarray, np.ndarray]],
    name: str = "moc-lora",
) -> Path:
    """Write `tensors` ({weight name: (A (rank, in), B (out, rank))}) as a GGUF LoRA adapter."""
    import gguf

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(out)
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_string("general.type", "adapter")
    writer.add_name(name)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(alpha))
    for weight in sorted(tensors):
        a, b = tensors[weight]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{weight}: A is {a.shape}, B is {b.shape}; ranks differ")
        writer.add_tensor(f"{weight}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{weight}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    _finish(writer)
    os.replace(tmp, out)
    return out


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _encode(array: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    import gguf

    if array.ndim == 1 or kind == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if kind in ("f16", "bf16"):
        return np.ascontiguousarray(array, dtype=np.float16), None
    quant = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), quant), quant


def write_model_gguf(
    base: str | Path,
    path: str | Path,
    tensors: dict[str, np.ndarray],
    *,
    name: str | None = None,
) -> Path:
    """Write a copy of GGUF `base` whose tensors are `tensors` (float32, numpy order)."""
    import gguf

    reader = gguf.GGUFReader(str(base))
    arch = str(reader.fields["general.architecture"].contents())
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(out)
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.name" and name is not None:
            writer.add_name(name)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    kinds = {t.name: SUPPORTED_TYPES.get(int(t.tensor_type), "f32") for t in reader.tensors}
    missing = set(kinds) - set(tensors)
    if missing:
        raise ValueError(f"tensors missing from the export: {', '.join(sorted(missing))}")
    for t in reader.tensors:
        data, raw = _encode(tensors[t.name], kinds[t.name])
        if raw is None:
            writer.add_tensor(t.name, data)
        else:
            writer.add_tensor(t.name, data, raw_dtype=raw)
    _finish(writer)
    os.replace(tmp, out)
    return out
