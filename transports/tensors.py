"""Tensors on the client wire: how a torch model's inputs arrive and its outputs leave.

A tensor is an object `{"dtype": "float32", "shape": [2, 4], "data": ...}` whose `data` is its
raw little-endian bytes in row-major order: base64 text in JSON, or bytes (or base64 text) in
msgpack. Outputs always carry base64 text, so one reply shape serves both encodings.

Pure: no I/O. Every refusal names the field, as the rest of the schema does; the sizes are
checked here, so a malformed tensor never reaches a worker.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

from actors.errors import InvalidRequest
from actors.types import TensorData

__all__ = [
    "ITEM_SIZES",
    "MAX_DIMS",
    "MAX_TENSORS",
    "parse_tensors",
    "tensor_view",
]

# Bytes per element of the dtypes the torch backend accepts (torch's names).
ITEM_SIZES: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
MAX_TENSORS = 16
MAX_DIMS = 8


def parse_tensors(value: Any, field: str) -> tuple[TensorData, ...]:
    """Validate a list of wire tensors into TensorData values."""
    if not isinstance(value, list | tuple):
        raise InvalidRequest(field, f"expected a list of tensors, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_TENSORS:
        raise InvalidRequest(field, f"expected 1 to {MAX_TENSORS} tensors; got {len(value)}")
    return tuple(_tensor(item, f"{field}[{i}]") for i, item in enumerate(value))


def tensor_view(tensor: TensorData) -> dict[str, Any]:
    """Return one output tensor as the wire carries it (data as base64 text)."""
    return {
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "data": base64.b64encode(tensor.data).decode("ascii"),
    }


def _tensor(value: Any, field: str) -> TensorData:
    if not isinstance(value, Mapping):
        raise InvalidRequest(field, f"expected an object, got {type(value).__name__}")
    dtype = value.get("dtype")
    if dtype not in ITEM_SIZES:
        raise InvalidRequest(f"{field}.dtype", f"must be one of {', '.join(ITEM_SIZES)}")
    shape = _shape(value.get("shape"), f"{field}.shape")
    data = _data(value.get("data"), f"{field}.data")
    expected = math.prod(shape) * ITEM_SIZES[dtype]
    if len(data) != expected:
        raise InvalidRequest(
            f"{field}.data",
            f"has {len(data)} bytes; {dtype} of shape {list(shape)} needs {expected}",
        )
    return TensorData(dtype, shape, data)


def _shape(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_DIMS:
        raise InvalidRequest(field, f"expected a list of at most {MAX_DIMS} sizes")
    for size in value:
        # bool is an int subclass; `true` is not a size.
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(field, "sizes must be non-negative integers")
    return tuple(value)


def _data(value: Any, field: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise InvalidRequest(field, "expected base64 text (or bytes in msgpack)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, "is not valid base64") from None
