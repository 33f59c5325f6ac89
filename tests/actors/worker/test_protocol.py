"""The worker wire protocol: every message round-trips; garbage is refused with ProtocolError."""

from __future__ import annotations

import struct

import msgpack
import pytest

from actors.types import ChatMessage, TensorData
from actors.worker.protocol import (
    MAX_STREAM_FRAME,
    PROTOCOL_VERSION,
    Cancel,
    Done,
    Embed,
    Embedded,
    Failed,
    FrameReader,
    Hello,
    Infer,
    Loaded,
    LoadFailed,
    LoadSpec,
    Message,
    MsgType,
    ProtocolError,
    SetThreads,
    Shutdown,
    Token,
    astuple_shallow,
    decode,
    encode,
    frame_bytes,
    tensor_data,
)

_TENSOR = TensorData("float32", (2, 2), struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))

MESSAGES: list[Message] = [
    Hello(PROTOCOL_VERSION, 4242),
    LoadSpec("gguf", "/models/tiny.gguf", 2048, -1, "cpu", None, 7, None, 2),
    LoadSpec("gguf", "/models/tiny.gguf", 512, 0, "cpu", None, 0, None, 0, False, 8),
    LoadSpec("torch", "/m/x.pt2", 0, 0, "nvml", 1, 0, "/m/lora.gguf"),
    Loaded(4242, 123.5, 0.25, "tiny@abc", 2048),
    LoadFailed("llama.cpp could not load /x: bad magic"),
    Infer(1, True, "hello", None, None, 16, 0.0, 0.9, ("\n", "END"), None),
    Infer(
        2,
        False,
        None,
        (ChatMessage("user", "hi"), ChatMessage("system", "be brief")),
        None,
        8,
        0.7,
        1.0,
        (),
        3,
    ),
    Infer(3, False, None, None, (_TENSOR, TensorData("int64", (0,), b"")), 1, 0.0, 1.0, (), None),
    Infer(
        4,
        True,
        (1, 72, 105),
        None,
        None,
        8,
        0.0,
        1.0,
        (),
        None,
        -0.5,
        1.5,
        1.1,
        ((72, 100.0), (5, -100.0)),
        '{"type": "object"}',
        2,
    ),
    Token(1, "h\u00e9llo"),
    Done(1, "hello", 5, 3, "length", None, 12.5),
    Done(3, "", 0, 0, "stop", (_TENSOR,), 0.0),
    Done(4, "Hi", 2, 3, "length", None, 1.0, 0, 2.5, ((b"H", -0.1, ((b"H", -0.1),)), (b"i", -0.2, ()))),
    Failed(2, "invalid_request", "messages", "no chat template"),
    Cancel(9),
    Shutdown(),
    SetThreads(4),
    Embed(5, ("hello", (1, 72, 105))),
    Embedded(5, (struct.pack("<2f", 0.6, 0.8), struct.pack("<2f", 1.0, 0.0)), 7, 12.5),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_decodes_to_an_equal_message(msg: Message) -> None:
    assert decode(encode(msg)) == msg


def test_message_type_numbers_never_change() -> None:
    assert {t.name: t.value for t in MsgType} == {
        "HELLO": 1,
        "LOAD": 2,
        "LOADED": 3,
        "LOAD_FAILED": 4,
        "INFER": 5,
        "TOKEN": 6,
        "DONE": 7,
        "FAILED": 8,
        "CANCEL": 9,
        "SHUTDOWN": 10,
        "EMBED": 11,
        "EMBEDDED": 12,
        "SET_THREADS": 13,
    }


def test_an_infer_frame_from_before_the_openai_parameters_decodes_with_their_defaults() -> None:
    old = msgpack.packb([MsgType.INFER, 1, False, "hi", None, None, 4, 0.7, 0.9, [], None])
    assert decode(old) == Infer(1, False, "hi", None, None, 4, 0.7, 0.9, (), None)
    assert decode(old).logit_bias == () and decode(old).json_schema is None  # type: ignore[union-attr]


def test_a_frame_starts_with_its_type_number() -> None:
    assert msgpack.unpackb(encode(Cancel(5))) == [MsgType.CANCEL, 5]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xc1garbage", "undecodable"),
        (msgpack.packb({"a": 1}), "must be an array"),
        (msgpack.packb([]), "must be an array"),
        (msgpack.packb([999, 1]), "unknown message type 999"),
        (msgpack.packb([MsgType.CANCEL]), "needs 1 fields, got 0"),
        (msgpack.packb([MsgType.CANCEL, 1, 2]), "needs 1 fields, got 2"),
        (msgpack.packb([MsgType.TOKEN, 1, msgpack.ExtType(77, b"")]), "unknown extension type 77"),
    ],
    ids=["not-msgpack", "a-map", "empty", "unknown-type", "too-few", "too-many", "unknown-ext"],
)
def test_garbage_frames_raise_protocol_error(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(frame)


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_refused() -> None:
    with pytest.raises(ProtocolError, match="needs 16 bytes, got 12"):
        tensor_data("float32", (2, 2), b"\x00" * 12)


def test_a_tensor_of_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unsupported tensor dtype"):
        tensor_data("object", (1,), b"\x00")


def test_encoding_something_that_is_not_a_message_fails_loudly() -> None:
    with pytest.raises(TypeError, match="not a protocol message"):
        encode(TensorData("float32", (), b"\x00\x00\x00\x00"))  # type: ignore[arg-type]


def test_a_stream_of_frames_decodes_the_same_whatever_the_chunk_boundaries() -> None:
    sent: list[Message] = [
        Infer(7, False, "hello", None, None, 1, 0.7, 0.9, (), None),
        Token(7, "h"),
        Done(7, "hi", 1, 2, "length", None, 12.5),
        Cancel(8),
    ]
    stream = b"".join(frame_bytes(m) for m in sent)
    for size in (1, 3, 7, len(stream)):
        reader = FrameReader()
        got: list[Message] = []
        for start in range(0, len(stream), size):
            got += reader.feed(stream[start : start + size])
        assert got == sent, size


def test_a_stream_frame_longer_than_the_limit_is_garbage() -> None:
    with pytest.raises(ProtocolError, match="past the limit"):
        FrameReader().feed(struct.pack("<I", MAX_STREAM_FRAME + 1) + b"x")


def test_a_stream_frame_that_is_not_a_message_is_refused() -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(struct.pack("<I", 3) + b"abc")


def test_a_load_spec_from_a_peer_without_the_parallel_field_decodes_with_one_slot() -> None:
    old = msgpack.packb([MsgType.LOAD, *astuple_shallow(LoadSpec("gguf", "/m/t.gguf"))][:-1])
    spec = decode(old)
    assert isinstance(spec, LoadSpec) and spec.parallel == 1 and spec.path == "/m/t.gguf"
