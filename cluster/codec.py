"""Bytes <-> messages: the only module that touches msgpack.

A packet is `MAGIC | version | flags | [tag] | body` where the body is a msgpack array of
messages (`[type, field, ...]`) and the tag, present when the keyring has keys, is
HMAC-SHA256 over header and body. Datagrams carry up to `packet_bytes`; stream frames (TCP
push-pull) use the same layout with a larger limit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from cluster.errors import (
    LocalUsageError,
    MalformedPacket,
    OversizedPacket,
    Unauthenticated,
    UnsupportedVersion,
)
from cluster.keyring import TAG_BYTES, Keyring
from cluster.messages import (
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    Message,
    MessageType,
    PushNodeState,
)

__all__ = [
    "FLAG_HMAC",
    "HEADER_BYTES",
    "MAGIC",
    "PACKET_OVERHEAD",
    "decode_packet",
    "encode_message",
    "encode_packet",
    "message_size",
    "message_to_wire",
]

MAGIC = 0xC5
FLAG_HMAC = 0x01
HEADER_BYTES = 3
PACKET_OVERHEAD = HEADER_BYTES + TAG_BYTES + 3
"""Bytes a packet spends beyond its messages: header, tag, and the msgpack array header."""


def _int(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise MalformedPacket(f"expected a non-negative int, got {type(v).__name__}")
    return v


def _str(v: Any) -> str:
    if type(v) is not str:
        raise MalformedPacket(f"expected str, got {type(v).__name__}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise MalformedPacket(f"expected bool, got {type(v).__name__}")
    return v


def _bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise MalformedPacket(f"expected bytes, got {type(v).__name__}")
    return v


def _addr(v: Any) -> tuple[str, int]:
    if type(v) is not list or len(v) != 2:
        raise MalformedPacket("expected [host, port]")
    port = _int(v[1])
    if port > 65535:
        raise MalformedPacket("port out of range")
    return _str(v[0]), port


def _state(v: Any) -> PushNodeState:
    if type(v) is not list or len(v) != 5:
        raise MalformedPacket("expected a 5-field node state")
    state = _int(v[3])
    if state > 3:
        raise MalformedPacket("unknown member state")
    return PushNodeState(_str(v[0]), _addr(v[1]), _int(v[2]), state, _bytes(v[4]))


def _states(v: Any) -> tuple[PushNodeState, ...]:
    if type(v) is not list:
        raise MalformedPacket("expected a list of node states")
    return tuple(_state(s) for s in v)


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "int": _int,
    "str": _str,
    "bool": _bool,
    "bytes": _bytes,
    "Address": _addr,
    "tuple[PushNodeState, ...]": _states,
}

# Per message type: its class and one decoder per field, derived from the dataclass fields.
_SCHEMA: dict[int, tuple[type[Message], tuple[Callable[[Any], Any], ...]]] = {
    int(t): (cls, tuple(_DECODERS[str(f.type)] for f in dataclasses.fields(cls)))
    for t, cls in MESSAGE_CLASSES.items()
}


def _to_wire(value: Any) -> Any:
    if isinstance(value, PushNodeState):
        return [value.name, list(value.addr), value.incarnation, value.state, value.meta]
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def message_to_wire(msg: Message) -> list[Any]:
    """Return the msgpack-ready list form of a message."""
    return [int(msg.TYPE), *(_to_wire(getattr(msg, f.name)) for f in dataclasses.fields(msg))]


def encode_message(msg: Message) -> bytes:
    """Return one message alone as msgpack (used for sizes and stream bodies).

    Raise LocalUsageError for a value the wire cannot carry (an int beyond 64 bits).
    """
    try:
        return bytes(msgpack.packb(message_to_wire(msg), use_bin_type=True))
    except (OverflowError, TypeError, ValueError) as exc:
        # msgpack's own errors would escape callers that handle LocalUsageError (the runner).
        raise LocalUsageError(f"{type(msg).__name__} cannot be encoded: {exc}") from None


def message_size(msg: Message) -> int:
    """Return the bytes a message takes inside a packet."""
    return len(encode_message(msg))


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big")


def encode_packet(messages: Sequence[Message], keyring: Keyring, limit: int) -> bytes:
    """Sign and frame messages as one packet; raise LocalUsageError if it exceeds `limit`.

    A message holding a value the wire cannot carry raises LocalUsageError too.
    """
    if not messages:
        raise LocalUsageError("a packet needs at least one message")
    body = _array_header(len(messages)) + b"".join(encode_message(m) for m in messages)
    flags = FLAG_HMAC if keyring.enabled else 0
    header = bytes([MAGIC, PROTOCOL_VERSION, flags])
    tag = keyring.sign(header + body) if keyring.enabled else b""
    packet = header + tag + body
    if len(packet) > limit:
        raise LocalUsageError(f"packet of {len(packet)} bytes exceeds the {limit}-byte limit")
    return packet


def decode_packet(data: bytes, keyring: Keyring, limit: int) -> list[Message]:
    """Verify and decode a packet; raise a PeerProtocolError subclass for anything bad."""
    if len(data) > limit:
        raise OversizedPacket(f"{len(data)} bytes > {limit}")
    if len(data) < HEADER_BYTES + 1 or data[0] != MAGIC:
        raise MalformedPacket("bad magic or truncated header")
    if data[1] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {data[1]}")
    flags = data[2]
    header = data[:HEADER_BYTES]
    if keyring.enabled:
        if not flags & FLAG_HMAC:
            raise Unauthenticated("unsigned packet")
        tag = data[HEADER_BYTES : HEADER_BYTES + TAG_BYTES]
        body = data[HEADER_BYTES + TAG_BYTES :]
        if len(tag) != TAG_BYTES or not keyring.verify(header + body, tag):
            raise Unauthenticated("no key verifies the packet")
    elif flags & FLAG_HMAC:
        body = data[HEADER_BYTES + TAG_BYTES :]
    else:
        body = data[HEADER_BYTES:]
    try:
        raw = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MalformedPacket(f"msgpack: {exc}") from None
    if type(raw) is not list or not raw:
        raise MalformedPacket("body is not a non-empty list of messages")
    return [_decode_message(item) for item in raw]


def _decode_message(item: Any) -> Message:
    if type(item) is not list or not item or type(item[0]) is not int:
        raise MalformedPacket("message is not [type, ...]")
    schema = _SCHEMA.get(item[0])
    if schema is None:
        raise MalformedPacket(f"unknown message type {item[0]}")
    cls, decoders = schema
    if len(item) - 1 != len(decoders):
        raise MalformedPacket(f"{MessageType(item[0]).name}: wrong field count")
    return cls(*(dec(v) for dec, v in zip(decoders, item[1:], strict=True)))
