"""ZMTP 3.1, the ZeroMQ wire protocol, as a sans-I/O codec (NULL security mechanism).

The peer RPC speaks it over asyncio streams (transports/zmtp_sockets.py) rather than through
libzmq, whose I/O thread adds two thread wake-ups to every message each way: a forwarded
request's round trip to its holder (README, Benchmarks). On the wire nothing changes: a libzmq
DEALER or ROUTER talks to these endpoints, and the tests check it. The legacy front (port 7211)
stays on libzmq: with 32 clients its I/O thread, reading on the other core, served 2,709-3,051
requests/s where this code on the loop served 2,304-2,413 (zmq_load, alternating runs).

Spec: rfc.zeromq.org 23/ZMTP (3.0) and 37/ZMTP (3.1). A connection starts with a 64-byte
greeting each way, then a READY command each way (socket type, optional identity), then traffic:
messages of one or more frames, each frame a flags byte, a size (1 byte, or 8 when LONG) and the
body, and commands (PING/PONG heartbeats in 3.1).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "GREETING_BYTES",
    "MECHANISM",
    "SIGNATURE_HEAD",
    "VERSION",
    "command",
    "Decoder",
    "encode_message",
    "Event",
    "greeting",
    "Ping",
    "pong",
    "Ready",
    "ready",
    "ZmtpError",
]

SIGNATURE_HEAD = b"\xff" + b"\x00" * 8 + b"\x7f"
VERSION = (3, 1)
MECHANISM = b"NULL".ljust(20, b"\x00")
GREETING_BYTES = 64

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


class ZmtpError(Exception):
    """The peer sent something that is not ZMTP 3 with the NULL mechanism, or too much of it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        """"malformed" or "oversized": the label it is counted under."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The peer's READY: its socket type and the identity it asks to be routed by (may be empty)."""

    socket_type: str
    identity: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """A ZMTP 3.1 heartbeat; it is answered with `pong(context)`."""

    context: bytes


Event = list[bytes] | Ready | Ping
"""What `Decoder.feed` returns: a whole message (its frames), the peer's READY, or a PING."""


def greeting(as_server: bool) -> bytes:
    """Return this side's 64-byte greeting."""
    return (
        SIGNATURE_HEAD
        + bytes(VERSION)
        + MECHANISM
        + (b"\x01" if as_server else b"\x00")
        + bytes(31)
    )


def command(name: bytes, data: bytes) -> bytes:
    """Return one command frame."""
    body = bytes((len(name),)) + name + data
    if len(body) > 255:
        return bytes((_COMMAND | _LONG,)) + _U64.pack(len(body)) + body
    return bytes((_COMMAND, len(body))) + body


def ready(socket_type: str, identity: bytes = b"") -> bytes:
    """Return the READY command announcing `socket_type` (and `identity`, when not empty)."""
    props = [(b"Socket-Type", socket_type.encode())]
    if identity:
        props.append((b"Identity", identity))
    data = b"".join(bytes((len(k),)) + k + _U32.pack(len(v)) + v for k, v in props)
    return command(b"READY", data)


def pong(context: bytes) -> bytes:
    """Return the PONG that answers a PING carrying `context`."""
    return command(b"PONG", context)


def encode_message(frames: Sequence[bytes]) -> bytes:
    """Return the bytes of one message of `frames` (at least one)."""
    parts: list[bytes] = []
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = _MORE if i < last else 0
        size = len(frame)
        if size > 255:
            parts.append(bytes((more | _LONG,)))
            parts.append(_U64.pack(size))
        else:
            parts.append(bytes((more, size)))
        parts.append(frame)
    return b"".join(parts)


class Decoder:
    """Turn the bytes a peer sends into events: its greeting is checked, then READY, then traffic.

    A message's frames are held until its last frame; a frame larger than `max_frame_bytes`, or
    a message of more than `max_frames` frames, is refused before its body is buffered.
    """

    def __init__(self, *, max_frame_bytes: int, max_frames: int = 16) -> None:
        self._buf = bytearray()
        self._greeted = False
        self._ready = False
        self._frames: list[bytes] = []
        self._max_frame_bytes = max_frame_bytes
        self._max_frames = max_frames

    def feed(self, data: bytes | memoryview) -> list[Event]:
        """Take bytes from the peer; return the events they complete (ZmtpError when invalid)."""
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = 0
        if not self._greeted:
            if len(buf) < GREETING_BYTES:
                self._check_greeting_prefix(bytes(buf))
                return events
            self._check_greeting(bytes(buf[:GREETING_BYTES]))
            self._greeted = True
            pos = GREETING_BYTES
        end = len(buf)
        while pos < end:
            flags = buf[pos]
            if flags & ~(_MORE | _LONG | _COMMAND):
                raise ZmtpError("malformed", f"reserved frame flags set: {flags:#04x}")
            if flags & _LONG:
                if end - pos < 9:
                    break
                size = _U64.unpack_from(buf, pos + 1)[0]
                head = 9
            else:
                if end - pos < 2:
                    break
                size = buf[pos + 1]
                head = 2
            if size > self._max_frame_bytes:
                raise ZmtpError(
                    "oversized", f"a {size}-byte frame (the limit is {self._max_frame_bytes})"
                )
            if end - pos - head < size:
                break
            body = bytes(buf[pos + head : pos + head + size])
            pos += head + size
            if flags & _COMMAND:
                event = self._command(body)
                if event is not None:
                    events.append(event)
                continue
            if not self._ready:
                raise ZmtpError("malformed", "a message before the READY command")
            self._frames.append(body)
            if flags & _MORE:
                if len(self._frames) >= self._max_frames:
                    raise ZmtpError(
                        "malformed", f"a message of more than {self._max_frames} frames"
                    )
                continue
            events.append(self._frames)
            self._frames = []
        del buf[:pos]
        return events

    def _check_greeting_prefix(self, head: bytes) -> None:
        """Refuse a wrong signature as soon as it shows (a peer may send it in pieces)."""
        if head and head[0] != 0xFF or len(head) >= 10 and not head[9] & 1:
            raise ZmtpError("malformed", "not a ZMTP greeting")

    def _check_greeting(self, head: bytes) -> None:
        self._check_greeting_prefix(head)
        if head[10] < 3:
            raise ZmtpError("malformed", f"ZMTP {head[10]}.{head[11]}: version 3 or later needed")
        if head[12:32] != MECHANISM:
            mechanism = head[12:32].rstrip(b"\x00").decode("ascii", "replace")
            raise ZmtpError("malformed", f"security mechanism {mechanism!r} (only NULL is spoken)")

    def _command(self, body: bytes) -> Event | None:
        if not body or len(body) < 1 + body[0]:
            raise ZmtpError("malformed", "a command without a name")
        name, data = body[1 : 1 + body[0]], body[1 + body[0] :]
        if name == b"READY":
            if self._ready:
                raise ZmtpError("malformed", "a second READY")
            self._ready = True
            return _parse_ready(data)
        if not self._ready:
            raise ZmtpError("malformed", f"command {name!r} before READY")
        if name == b"PING":
            if len(data) < 2:
                raise ZmtpError("malformed", "a PING without its TTL")
            return Ping(data[2:18])
        if name == b"ERROR":
            reason = data[1 : 1 + data[0]].decode("utf-8", "replace") if data else ""
            raise ZmtpError("malformed", f"the peer reported an error: {reason}")
        return None  # PONG, or a command of a later minor version: nothing to do


def _parse_ready(data: bytes) -> Ready:
    props: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        name_len = data[pos]
        name = data[pos + 1 : pos + 1 + name_len]
        pos += 1 + name_len
        if pos + 4 > len(data):
            raise ZmtpError("malformed", "a READY property cut short")
        value_len = _U32.unpack_from(data, pos)[0]
        pos += 4
        if pos + value_len > len(data):
            raise ZmtpError("malformed", "a READY property value cut short")
        props[name.lower()] = data[pos : pos + value_len]
        pos += value_len
    socket_type = props.get(b"socket-type")
    if socket_type is None:
        raise ZmtpError("malformed", "READY without a Socket-Type")
    return Ready(socket_type.decode("ascii", "replace"), props.get(b"identity", b""))
