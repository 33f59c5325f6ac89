"""The messages between a ModelActor and its worker process, and their one msgpack codec.

A frame is a msgpack array `[type, field, field, ...]`, fields in the dataclass's order. Tensors
and chat messages travel as msgpack extension types (raw bytes plus dtype and shape: never a
pickle). Sequences decode as tuples, so decoded messages compare equal to the ones encoded.

Conversation, on the control socket (ZMQ PAIR): the worker connects and sends `Hello`; the
supervisor answers `LoadSpec`; the worker replies `Loaded` or `LoadFailed`; later `Shutdown`
makes it exit. On each data link (a connection to the worker's Unix socket): for each `Infer`
the worker sends zero or more `Token`s and exactly one `Done` or `Failed`; `Cancel` may arrive
at any time (stale ones are ignored); for each `Embed`, one `Embedded` or `Failed`. A request never travels on the control socket.

On the data socket (a Unix stream socket, see actors/worker/channel.py) each frame travels with a
4-byte little-endian length before it: `frame_bytes` adds it, `FrameReader` takes a byte stream
apart again. Both are pure: the sockets are the callers'.
"""

from __future__ import annotations

import struct
from dataclasses import MISSING, dataclass, fields
from enum import IntEnum
from typing import Any, Literal

import msgpack

from actors.types import (
    DEFAULT_N_CTX,
    Backend,
    ChatMessage,
    DeviceKind,
    GenerationParams,
    TensorData,
    TokenLogprob,
)

# Bump when a message changes shape; the supervisor refuses a worker that speaks another version.
PROTOCOL_VERSION = 2  # 2: sampling parameters, token prompts, logprobs, embeddings


class MsgType(IntEnum):
    """Message type numbers. Append only: these numbers are on the wire."""

    HELLO = 1
    LOAD = 2
    LOADED = 3
    LOAD_FAILED = 4
    INFER = 5
    TOKEN = 6
    DONE = 7
    FAILED = 8
    CANCEL = 9
    SHUTDOWN = 10
    EMBED = 11
    EMBEDDED = 12
    SET_THREADS = 13


class _Ext(IntEnum):
    """msgpack extension codes. Append only: these numbers are on the wire."""

    TENSOR = 1
    CHAT_MESSAGE = 2


class ProtocolError(Exception):
    """A frame from the other side could not be decoded (garbage, unknown type, wrong version)."""


@dataclass(frozen=True, slots=True)
class Hello:
    """Worker -> supervisor: connected and ready for a LoadSpec."""

    version: int
    pid: int


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Supervisor -> worker: load this model; also what the backend loads (one shape for both).

    `n_ctx` is the context in tokens (a torch model ignores it); `gpu_layers` -1 offloads every
    layer; `device_kind` "nvml" puts the model on GPU `device_index`. `n_threads` 0 lets the
    backend choose (llama.cpp: half the cores); set it to pin decode threads. `cpu_repack` lets
    llama.cpp repack CPU-resident GGUF weights (see `[models] cpu_repack` in
    actors/serving/config.py for why it is off by default). `parallel` > 1 serves that many
    requests at once on a GGUF model, each slot with its own `n_ctx` of KV cache (the batching
    engine); 1 serves them one at a time. The worker lowers its priority by `nice` before it
    loads (its decode threads inherit it).
    """

    backend: Backend
    path: str
    n_ctx: int = DEFAULT_N_CTX
    gpu_layers: int = 0
    device_kind: DeviceKind = "cpu"
    device_index: int | None = None
    seed: int = 0
    lora_path: str | None = None
    n_threads: int = 0
    cpu_repack: bool = False
    parallel: int = 1
    nice: int = 0

    @property
    def on_gpu(self) -> bool:
        """Whether the model goes to a GPU (a simulated device is the CPU)."""
        return self.device_kind == "nvml"


@dataclass(frozen=True, slots=True)
class Loaded:
    """Worker -> supervisor: the model is ready; memory measured in MiB across the load.

    `n_ctx` is the context the backend made (0 for a tensor model); `chat_template` names the
    template chat requests are rendered with ("model": the GGUF's own, "chatml": the fallback for
    a model without one, "": no chat).
    """

    pid: int
    measured_mb: float
    load_seconds: float
    version: str
    n_ctx: int
    chat_template: str = ""


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """Worker -> supervisor: the model could not be loaded; the worker exits after sending."""

    error: str


_PARAMS = GenerationParams()  # the defaults of the fields added after the first ten


@dataclass(frozen=True, slots=True)
class Infer:
    """Supervisor -> worker: one request; exactly one of prompt, messages, tensors is set.

    A prompt is text or token ids. The sampling fields are `GenerationParams`'s, flat; those
    after `seed` were added later and default as GenerationParams does (older frames decode).
    """

    request_id: int
    stream: bool
    prompt: str | tuple[int, ...] | None
    messages: tuple[ChatMessage, ...] | None
    tensors: tuple[TensorData, ...] | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    presence_penalty: float = _PARAMS.presence_penalty
    frequency_penalty: float = _PARAMS.frequency_penalty
    repeat_penalty: float = _PARAMS.repeat_penalty
    logit_bias: tuple[tuple[int, float], ...] = _PARAMS.logit_bias
    json_schema: str | None = _PARAMS.json_schema
    logprobs: int | None = _PARAMS.logprobs


@dataclass(frozen=True, slots=True)
class Token:
    """Worker -> supervisor: a piece of streamed text (never part of a stop sequence)."""

    request_id: int
    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """Worker -> supervisor: the request finished; `text` is the whole output.

    `memory_mb` lets the supervisor track the peak: llama.cpp's compute buffer becomes resident
    only as long prompts use it, so memory measured at load is not yet the working size.
    """

    request_id: int
    text: str
    tokens_generated: int
    prompt_tokens: int
    finish_reason: str
    tensors: tuple[TensorData, ...] | None
    memory_mb: float  # the worker's memory now, measured as in Loaded (CPU: RSS growth)
    prompt_tokens_reused: int = 0  # prompt tokens whose KV a slot already held
    first_token_ms: float | None = None  # from taking the request to its first token
    logprobs: tuple[TokenLogprob, ...] | None = None  # when the Infer asked for them


FailureKind = Literal["invalid_request", "internal"]


@dataclass(frozen=True, slots=True)
class Failed:
    """Worker -> supervisor: the request failed; `kind` says whose fault, `field` what was bad."""

    request_id: int
    kind: str
    field: str
    message: str


@dataclass(frozen=True, slots=True)
class Cancel:
    """Supervisor -> worker: stop request `request_id` between tokens."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Supervisor -> worker: exit now."""


@dataclass(frozen=True, slots=True)
class SetThreads:
    """Supervisor -> worker (control): decode with `n_threads` from the next step on (the
    model's share of the CPU changed as other models came or went)."""

    n_threads: int


@dataclass(frozen=True, slots=True)
class Embed:
    """Supervisor -> worker: embed each input (text, or token ids); answered by one `Embedded`
    or `Failed` (an input that does not fit: invalid_request naming `input` or `input[i]`)."""

    request_id: int
    inputs: tuple[str | tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class Embedded:
    """Worker -> supervisor: one L2-normalised vector per input, each little-endian float32
    bytes; `prompt_tokens` counts the tokens of every input; `memory_mb` as in Done."""

    request_id: int
    vectors: tuple[bytes, ...]
    prompt_tokens: int
    memory_mb: float


Message = (
    Hello
    | LoadSpec
    | Loaded
    | LoadFailed
    | Infer
    | Token
    | Done
    | Failed
    | Cancel
    | Shutdown
    | SetThreads
    | Embed
    | Embedded
)

_BY_TYPE: dict[int, type[Any]] = {
    MsgType.HELLO: Hello,
    MsgType.LOAD: LoadSpec,
    MsgType.LOADED: Loaded,
    MsgType.LOAD_FAILED: LoadFailed,
    MsgType.INFER: Infer,
    MsgType.TOKEN: Token,
    MsgType.DONE: Done,
    MsgType.FAILED: Failed,
    MsgType.CANCEL: Cancel,
    MsgType.SHUTDOWN: Shutdown,
    MsgType.EMBED: Embed,
    MsgType.EMBEDDED: Embedded,
    MsgType.SET_THREADS: SetThreads,
}
_BY_CLASS: dict[type[Any], int] = {cls: num for num, cls in _BY_TYPE.items()}
_FIELD_COUNT: dict[int, int] = {num: len(fields(cls)) for num, cls in _BY_TYPE.items()}
# Fields a frame may leave off at its end: those with defaults (LoadSpec's `parallel` and
# `nice`, added later), so a frame from a peer one field older still decodes.
_REQUIRED_COUNT: dict[int, int] = {
    num: sum(f.default is MISSING and f.default_factory is MISSING for f in fields(cls))
    for num, cls in _BY_TYPE.items()
}
# Field names per class, looked up once: `fields()` on every message was a few percent of it.
_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls)) for cls in _BY_CLASS
}


def _default(obj: object) -> msgpack.ExtType:
    if isinstance(obj, TensorData):
        payload = msgpack.packb([obj.dtype, list(obj.shape), obj.data], use_bin_type=True)
        return msgpack.ExtType(_Ext.TENSOR, payload)
    if isinstance(obj, ChatMessage):
        payload = msgpack.packb([obj.role, obj.content], use_bin_type=True)
        return msgpack.ExtType(_Ext.CHAT_MESSAGE, payload)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> object:
    if code == _Ext.TENSOR:
        dtype, shape, raw = msgpack.unpackb(data, raw=False, use_list=False)
        return tensor_data(dtype, tuple(shape), raw)
    if code == _Ext.CHAT_MESSAGE:
        role, content = msgpack.unpackb(data, raw=False, use_list=False)
        if not isinstance(role, str) or not isinstance(content, str):
            raise ProtocolError("chat message fields must be strings")
        return ChatMessage(role, content)
    raise ProtocolError(f"unknown extension type {code}")


def tensor_data(dtype: object, shape: tuple[object, ...], data: object) -> TensorData:
    """Build a TensorData after checking that its byte count matches dtype and shape."""
    if not isinstance(dtype, str) or not isinstance(data, bytes):
        raise ProtocolError("tensor dtype must be a string and data bytes")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        raise ProtocolError(f"unsupported tensor dtype {dtype!r}")
    count = 1
    for d in shape:
        count *= int(d)  # type: ignore[call-overload]
    if count * itemsize != len(data):
        raise ProtocolError(
            f"tensor of {dtype}{list(shape)} needs {count * itemsize} bytes, got {len(data)}"
        )
    return TensorData(dtype, tuple(int(d) for d in shape), data)  # type: ignore[call-overload]


# Little-endian dtypes a tensor may carry, by the names numpy and torch both understand.
DTYPE_SIZES: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


def encode(msg: Message) -> bytes:
    """Encode one message as a frame."""
    num = _BY_CLASS.get(type(msg))
    if num is None:
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    out: bytes = msgpack.packb([num, *astuple_shallow(msg)], use_bin_type=True, default=_default)
    return out


def astuple_shallow(msg: object) -> tuple[Any, ...]:
    """Return a dataclass's field values in order, without astuple's deep copy of nested ones."""
    names = _FIELD_NAMES.get(type(msg))
    if names is None:
        names = tuple(f.name for f in fields(msg))  # type: ignore[arg-type]
    return tuple(getattr(msg, name) for name in names)


def decode(frame: bytes) -> Message:
    """Decode one frame; raise ProtocolError for anything that is not a valid message."""
    try:
        items = msgpack.unpackb(frame, raw=False, use_list=False, ext_hook=_ext_hook)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(items, tuple) or not items or not isinstance(items[0], int):
        raise ProtocolError("a frame must be an array that starts with a message type")
    num, values = items[0], items[1:]
    cls = _BY_TYPE.get(num)
    if cls is None:
        raise ProtocolError(f"unknown message type {num}")
    most = _FIELD_COUNT[num]
    if not _REQUIRED_COUNT[num] <= len(values) <= most:
        raise ProtocolError(f"{cls.__name__} needs {most} fields, got {len(values)}")
    msg: Message = cls(*values)
    return msg


# ---- length-prefixed frames for a byte stream ----

MAX_STREAM_FRAME = 1 << 30
"""A length past this is not a frame but garbage (tensors included, frames stay far below)."""

READ_CHUNK = 1 << 16
"""Bytes asked of a stream socket per read. Not more: the buffer of a 256 KiB read is mapped,
shrunk and unmapped by glibc each time (mmap, mremap, munmap: 23-34 us a read, against 5 us)."""

_LENGTH = struct.Struct("<I")


def frame_bytes(msg: Message) -> bytes:
    """Encode one message with its length prefix, ready for a stream socket."""
    body = encode(msg)
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Split a byte stream into the messages it carries, whatever the chunk boundaries."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Take the next chunk; return every message it completes (ProtocolError on garbage)."""
        buf = self._buf
        buf += data
        out: list[Message] = []
        start = 0
        while len(buf) - start >= 4:
            (size,) = _LENGTH.unpack_from(buf, start)
            if size > MAX_STREAM_FRAME:
                raise ProtocolError(f"a frame of {size} bytes is past the limit")
            end = start + 4 + size
            if end > len(buf):
                break
            out.append(decode(bytes(buf[start + 4 : end])))
            start = end
        if start:
            del buf[:start]
        return out


__all__ = [
    "MAX_STREAM_FRAME",
    "FrameReader",
    "frame_bytes",
    "PROTOCOL_VERSION",
    "Cancel",
    "Done",
    "Embed",
    "Embedded",
    "Failed",
    "Hello",
    "Infer",
    "LoadFailed",
    "LoadSpec",
    "Loaded",
    "Message",
    "MsgType",
    "ProtocolError",
    "SetThreads",
    "Shutdown",
    "Token",
    "decode",
    "encode",
    "tensor_data",
]
