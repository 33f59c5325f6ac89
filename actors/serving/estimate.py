"""Estimate the memory a GGUF model needs from its header, before loading it.

The header is read with a small streaming parser (scalar metadata and tensor shapes; arrays such
as the vocabulary are skipped), so an estimate costs milliseconds even for large files. Every
GGUF model is served by the batching engine (actors/worker/backends/gguf_engine.py), with
`parallel` slots of `n_ctx` tokens each. The sum:

- weights: the bytes of every tensor placed on the device. On the CPU that is all of them; on a
  GPU the repeating layers up to `gpu_layers` and, when every layer is offloaded, the output head
  (llama.cpp keeps the token embeddings on the host).
- KV cache: f16 keys and values for `n_ctx` positions per slot,
  2 * n_layer * n_ctx * n_embd_kv * 2 * parallel bytes.
- compute: llama.cpp's graph buffer for one micro-batch of `n_ubatch` tokens (the engine's
  step). The engine lets llama.cpp turn flash attention on (as llama-server does), so there is no
  attention-score matrix: the activations and logits of the micro-batch and the attention mask of
  one slot's context.
- overhead: per slot its output row and the logits kept for a repeated prompt, and a fixed
  host cost (ENGINE_FIXED_OVERHEAD_MB: the context, the thread pool's work buffers, the slots'
  sampler chains, the vocabulary maps, allocator slack). On a GPU, the worker process's CUDA
  context instead (CUDA_CONTEXT_MB).

What this estimates is the working size: the memory resident once prompts have filled the
slots. Right after a CPU load less is resident (the compute buffer is reserved but its pages
are touched only by long prompts); the worker reports its memory after every request so the
supervisor can follow the real peak.

The test `tests/actors/serving/test_estimate.py` loads three sizes through the worker and compares
(and two with 4 slots).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from actors.errors import ModelFileInvalid
from actors.worker.backends.gguf_engine import STEP_TOKENS

MIB = 1024.0 * 1024.0

# A fixed host cost of one loaded model beyond its sized buffers, fitted on llama-cpp-python
# 0.3.36 (CPU build): with 4 slots of 512 tokens, 4 prompts filling them, the tiny, small and
# medium50m models left 4.7, 4.5 and 6.7 MiB after the sized parts.
ENGINE_FIXED_OVERHEAD_MB = 4.6

# Device memory every worker process holds on a GPU before its first tensor: the CUDA context,
# the loaded kernels and the libraries' handles. Measured on an H200 (driver 580.159.04, CUDA
# 13.0) with bench/gpu_check.py: a process holding one 8192 MiB torch allocation used 8802 MiB,
# and a torch worker with 256 MiB of weights 776 MiB (nvidia-smi and NVML agreed to the MiB).
CUDA_CONTEXT_MB = 512.0

_GGUF_MAGIC = b"GGUF"
# GGUF metadata value types; sizes of the fixed-width ones.
_SCALAR = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# ggml tensors have at most 4 dimensions (GGML_MAX_DIMS); real metadata nests arrays at most
# once or twice. Bounds on what a crafted header may claim, so it fails fast and cleanly.
_MAX_DIMS = 4
_MAX_ARRAY_DEPTH = 8


class GgufFormatError(ModelFileInvalid, ValueError):
    """The file is not a GGUF model this estimator understands (a client error: 400)."""


@dataclass(frozen=True, slots=True)
class GgufHeader:
    """The parts of a GGUF header the estimate needs."""

    metadata: dict[str, object]  # scalar and string values; arrays are skipped
    array_lengths: dict[str, int]  # length of each skipped array, e.g. tokenizer.ggml.tokens
    tensors: dict[str, int]  # tensor name -> bytes in the file


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """The memory one loaded model needs on its device, in MiB."""

    weights_mb: float
    kv_mb: float
    compute_mb: float
    overhead_mb: float

    @property
    def total_mb(self) -> float:
        """Return the sum of the parts."""
        return self.weights_mb + self.kv_mb + self.compute_mb + self.overhead_mb


class _Reader:
    """Read a header, refusing any count or length that the file's size cannot hold."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.size = os.fstat(fh.fileno()).st_size

    def remaining(self) -> int:
        return self.size - self.fh.tell()

    def count(self, n: int, item_bytes: int, what: str) -> int:
        """Return `n` if `n` items of at least `item_bytes` each fit in the rest of the file."""
        if n * item_bytes > self.remaining():
            raise GgufFormatError(f"implausible {what} ({n}) in GGUF header: the file is too short")
        return n

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        raw = self.fh.read(size)
        if len(raw) != size:
            raise GgufFormatError("truncated GGUF header")
        return struct.unpack("<" + fmt, raw)

    def u32(self) -> int:
        return int(self.take("I")[0])

    def u64(self) -> int:
        return int(self.take("Q")[0])

    def string(self) -> str:
        n = self.u64()
        if n > 1 << 30 or n > self.remaining():
            raise GgufFormatError("implausible string length in GGUF header")
        raw = self.fh.read(n)
        if len(raw) != n:
            raise GgufFormatError("truncated GGUF header")
        return raw.decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if n > self.remaining():
            raise GgufFormatError("truncated GGUF header")
        self.fh.seek(n, 1)

    def value(self, vtype: int) -> object:
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])[0]
        if vtype == _STRING:
            return self.string()
        raise GgufFormatError(f"unknown GGUF value type {vtype}")

    def skip_array(self, itype: int, count: int, depth: int = 0) -> None:
        if depth >= _MAX_ARRAY_DEPTH:
            raise GgufFormatError(f"GGUF arrays nested deeper than {_MAX_ARRAY_DEPTH}")
        if itype in _SCALAR:
            size = struct.calcsize("<" + _SCALAR[itype])
            self.skip(size * self.count(count, size, "array length"))
        elif itype == _STRING:
            for _ in range(self.count(count, 8, "array length")):
                self.skip(self.u64())
        elif itype == _ARRAY:
            for _ in range(self.count(count, 12, "array length")):
                inner, n = self.u32(), self.u64()
                self.skip_array(inner, n, depth + 1)
        else:
            raise GgufFormatError(f"unknown GGUF array item type {itype}")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as exc:
        raise GgufFormatError(f"unknown tensor type {ggml_type}") from exc
    n = 1
    for d in dims:
        n *= d
    return n * size // block


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Read a GGUF file's metadata and tensor sizes without reading its tensor data.

    Raise GgufFormatError for anything that is not a well-formed GGUF header, whatever its bytes.
    """
    try:
        with open(path, "rb") as fh:
            return _read_header(_Reader(fh), path)
    except OSError as exc:
        raise GgufFormatError(f"cannot read {path}: {exc.strerror}") from None


def _read_header(r: _Reader, path: str | Path) -> GgufHeader:
    if r.fh.read(4) != _GGUF_MAGIC:
        raise GgufFormatError(f"{path} is not a GGUF file")
    version = r.u32()
    if version < 2:
        raise GgufFormatError(f"GGUF version {version} is too old")
    n_tensors = r.count(r.u64(), 24, "tensor count")  # name length, dims, type, offset
    n_kv = r.count(r.u64(), 12, "metadata count")  # key length and value type
    metadata: dict[str, object] = {}
    arrays: dict[str, int] = {}
    for _ in range(n_kv):
        key, vtype = r.string(), r.u32()
        if vtype == _ARRAY:
            itype, count = r.u32(), r.u64()
            arrays[key] = count
            r.skip_array(itype, count)
        else:
            metadata[key] = r.value(vtype)
    tensors: dict[str, int] = {}
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.u32()
        if n_dims > _MAX_DIMS:
            raise GgufFormatError(f"tensor {name!r} has {n_dims} dimensions; ggml has 4")
        dims = [r.u64() for _ in range(n_dims)]
        ggml_type = r.u32()
        r.u64()  # offset
        tensors[name] = _tensor_bytes(ggml_type, dims)
    return GgufHeader(metadata, arrays, tensors)


def _int(meta: dict[str, object], key: str, default: int | None = None) -> int:
    """Read a size from the metadata: a whole number of at least 1 (a 0 would divide by zero)."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GgufFormatError(f"GGUF metadata lacks a number for {key}")
    if value < 1:
        raise GgufFormatError(f"GGUF metadata {key} is {value}; it must be at least 1")
    return int(value)


@dataclass(frozen=True, slots=True)
class _Hparams:
    n_layer: int
    n_embd: int
    n_head: int
    n_embd_kv: int
    n_ff: int
    n_vocab: int


def _hparams(header: GgufHeader) -> _Hparams:
    meta = header.metadata
    arch = str(meta.get("general.architecture", "llama"))
    n_embd = _int(meta, f"{arch}.embedding_length")
    n_head = _int(meta, f"{arch}.attention.head_count")
    n_head_kv = _int(meta, f"{arch}.attention.head_count_kv", n_head)
    head_k = _int(meta, f"{arch}.attention.key_length", n_embd // n_head)
    n_vocab = header.array_lengths.get("tokenizer.ggml.tokens") or _int(meta, f"{arch}.vocab_size")
    return _Hparams(
        n_layer=_int(meta, f"{arch}.block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_embd_kv=head_k * n_head_kv,
        n_ff=_int(meta, f"{arch}.feed_forward_length", 4 * n_embd),
        n_vocab=n_vocab,
    )


def split_weights(header: GgufHeader, n_layer: int, gpu_layers: int) -> tuple[int, int]:
    """Return (device bytes, host bytes) of the weights when `gpu_layers` layers are offloaded.

    llama.cpp offloads the last `gpu_layers` repeating layers, then the output head once all of
    them are (n_gpu_layers > n_layer); token embeddings always stay on the host.
    """
    n_off = n_layer + 1 if gpu_layers < 0 else min(gpu_layers, n_layer + 1)
    first_offloaded = n_layer - min(n_off, n_layer)
    device = host = 0
    for name, nbytes in header.tensors.items():
        if name.startswith("blk."):
            on_device = _layer_of(name) >= first_offloaded and n_off > 0
        elif name.startswith("token_embd"):
            on_device = False
        else:  # output head and final norm
            on_device = n_off > n_layer
        if on_device:
            device += nbytes
        else:
            host += nbytes
    return device, host


def _layer_of(tensor: str) -> int:
    """Return N of a tensor named `blk.N.*`."""
    layer = tensor.split(".")[1]
    if not layer.isdigit():
        raise GgufFormatError(f"tensor {tensor!r} does not name its layer")
    return int(layer)


def estimate_gguf_memory(
    path: str | Path,
    *,
    n_ctx: int,
    gpu_layers: int = -1,
    on_gpu: bool = False,
    n_ubatch: int = STEP_TOKENS,
    parallel: int = 1,
) -> MemoryEstimate:
    """Estimate the memory the batching engine needs for `path`: `parallel` slots of `n_ctx`
    tokens each and micro-batches of `n_ubatch` tokens.

    On the CPU (`on_gpu` False) everything is counted on the host. On a GPU the estimate is
    of device memory: offloaded weights, the KV cache and compute buffer of offloaded layers.
    """
    header = read_gguf_header(path)
    hp = _hparams(header)
    n_ubatch = min(n_ubatch, n_ctx * parallel)
    device_w, host_w = split_weights(header, hp.n_layer, gpu_layers)
    if on_gpu:
        kv_layers = hp.n_layer if gpu_layers < 0 else min(gpu_layers, hp.n_layer)
        weights = device_w
    else:
        weights, kv_layers = device_w + host_w, hp.n_layer
    kv = 2 * kv_layers * n_ctx * hp.n_embd_kv * 2 * parallel
    f32 = 4
    compute = 0
    if kv_layers or not on_gpu:
        acts = n_ubatch * (2 * hp.n_embd + 2 * hp.n_ff) * f32
        logits = n_ubatch * hp.n_vocab * f32
        mask = n_ubatch * n_ctx * f32  # a slot's stream: each sequence attends to its own cells
        compute = acts + logits + mask
    overhead = CUDA_CONTEXT_MB
    if not on_gpu:
        output = parallel * (2 * hp.n_vocab * f32 + hp.n_embd * f32)
        overhead = output / MIB + ENGINE_FIXED_OVERHEAD_MB
    return MemoryEstimate(
        weights_mb=weights / MIB,
        kv_mb=kv / MIB,
        compute_mb=compute / MIB,
        overhead_mb=overhead,
    )
