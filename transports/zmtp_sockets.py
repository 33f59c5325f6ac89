"""ZMQ ROUTER and DEALER endpoints on asyncio TCP streams, speaking ZMTP 3.1 (transports/zmtp.py).

They behave as libzmq's do where the peer RPC relies on it: a ROUTER gives each connection a
routing id and drops a reply whose connection is gone; a DEALER connects when first used, queues
while connecting, and reconnects on its next send after losing its connection. Unlike libzmq
they say so when a connection breaks (`on_broken`): a request in flight on a broken connection
can never be answered (a new connection is a new routing id), so its caller need not wait out a
timeout to learn it. Messages are written and read on the event loop's thread: no I/O thread.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Protocol, cast

from transports.zmtp import Decoder, Ping, Ready, ZmtpError, encode_message, greeting, pong, ready

__all__ = [
    "HANDSHAKE_S",
    "READ_BYTES",
    "DealerSocket",
    "OnFrames",
    "QueueFull",
    "RouterSocket",
]

log = logging.getLogger(__name__)

OnFrames = Callable[[list[bytes]], None]

_PEERS = {"DEALER": ("ROUTER", "DEALER", "REP"), "ROUTER": ("DEALER", "ROUTER", "REQ")}
"""Which socket types each side may talk to (ZMTP 3.0, "The Socket Type Property")."""

HANDSHAKE_S = 10.0
"""A connection that has not sent its greeting and READY by then is closed."""

READ_BYTES = 64 * 1024
"""Read into a buffer of this size kept by the connection: asyncio's own reads allocate 256 KiB
each, which glibc maps, shrinks and unmaps every time (mmap, mremap, munmap: 23-34 us a read,
against 5 us). A round trip of the peer RPC in one process: 337 -> 189 us."""


class QueueFull(Exception):
    """The peer has not been reading: more is waiting for it than the socket's limit."""


class _Owner(Protocol):
    def _ready(self, conn: _Connection, peer: Ready) -> None: ...

    def _message(self, conn: _Connection, frames: list[bytes]) -> None: ...

    def _refused(self, conn: _Connection, error: ZmtpError) -> None: ...

    def _lost(self, conn: _Connection) -> None: ...


class _Connection(asyncio.BufferedProtocol):
    """One ZMTP connection: sends this side's greeting and READY, decodes what the peer sends."""

    def __init__(
        self, owner: _Owner, socket_type: str, max_frame_bytes: int, handshake_s: float
    ) -> None:
        self._owner = owner
        self._type = socket_type
        self._handshake_s = handshake_s
        self._decoder = Decoder(max_frame_bytes=max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.routing_id = b""
        self._handshake: asyncio.TimerHandle | None = None
        self._scratch = memoryview(bytearray(READ_BYTES))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports, for one, do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(greeting(as_server=self._type == "ROUTER") + ready(self._type))
        loop = asyncio.get_running_loop()
        self._handshake = loop.call_later(
            self._handshake_s, self._refuse, "malformed", "no greeting and READY in time"
        )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self._decoder.feed(self._scratch[:nbytes])
        except ZmtpError as exc:
            self._refuse(exc.reason, str(exc))
            return
        for event in events:
            if type(event) is list:
                try:
                    self._owner._message(self, event)
                except Exception:  # a bug handling one message must not drop the connection
                    log.exception("a message from a peer could not be handled")
            elif isinstance(event, Ready):
                if event.socket_type not in _PEERS[self._type]:
                    self._refuse(
                        "malformed", f"a {event.socket_type} cannot talk to a {self._type}"
                    )
                    return
                if self._handshake is not None:
                    self._handshake.cancel()
                    self._handshake = None
                self._owner._ready(self, event)
            elif isinstance(event, Ping):
                self.write(pong(event.context))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake is not None:
            self._handshake.cancel()
            self._handshake = None
        self.transport = None
        self._owner._lost(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def queued(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _refuse(self, reason: str, detail: str) -> None:
        self._owner._refused(self, ZmtpError(reason, detail))
        self.abort()


class RouterSocket:
    """Accept DEALER connections; `on_frames([routing_id, *frames])` for each message."""

    def __init__(
        self,
        on_frames: OnFrames,
        *,
        on_refused: Callable[[str], None] | None = None,
        max_frame_bytes: int,
        max_queued_bytes: int = 64 * 1024 * 1024,
        handshake_s: float = HANDSHAKE_S,
    ) -> None:
        self._on_frames = on_frames
        self._on_refused = on_refused
        self._handshake_s = handshake_s
        self._max_frame_bytes = max_frame_bytes
        self._max_queued_bytes = max_queued_bytes
        self._connections: dict[bytes, _Connection] = {}
        self._pending: set[_Connection] = set()
        self._next_id = secrets.randbits(32)
        self._server: asyncio.Server | None = None

    async def bind(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); return the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    def send(self, frames: list[bytes]) -> bool:
        """Send `frames[1:]` to the connection `frames[0]` names; False when it is gone (or not
        reading, past the limit): the message is dropped, as libzmq's ROUTER drops it."""
        conn = self._connections.get(frames[0])
        if conn is None or conn.queued() > self._max_queued_bytes:
            return False
        conn.write(encode_message(frames[1:]))
        return True

    def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in [*self._connections.values(), *self._pending]:
            conn.abort()
        self._connections.clear()
        self._pending.clear()

    def _accept(self) -> _Connection:
        conn = _Connection(self, "ROUTER", self._max_frame_bytes, self._handshake_s)
        self._pending.add(conn)
        return conn

    def _ready(self, conn: _Connection, peer: Ready) -> None:
        self._pending.discard(conn)
        if peer.identity and peer.identity[:1] != b"\x00" and peer.identity not in self._connections:
            conn.routing_id = peer.identity  # as libzmq: ids starting with 0 are its own
        else:
            self._next_id = (self._next_id + 1) & 0xFFFFFFFF
            conn.routing_id = b"\x00" + self._next_id.to_bytes(4, "big")
        self._connections[conn.routing_id] = conn

    def _message(self, conn: _Connection, frames: list[bytes]) -> None:
        self._on_frames([conn.routing_id, *frames])

    def _refused(self, conn: _Connection, error: ZmtpError) -> None:
        log.debug("peer connection refused: %s", error)
        if self._on_refused is not None:
            self._on_refused(error.reason)

    def _lost(self, conn: _Connection) -> None:
        self._pending.discard(conn)
        if self._connections.get(conn.routing_id) is conn:
            del self._connections[conn.routing_id]


class DealerSocket:
    """One connection to a ROUTER at host:port; `on_frames(frames)` for each reply."""

    def __init__(
        self,
        host: str,
        port: int,
        on_frames: OnFrames,
        *,
        on_broken: Callable[[str], None] | None = None,
        max_frame_bytes: int,
        max_queued: int = 1000,
        max_queued_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._host, self._port = host, port
        self._on_frames = on_frames
        self._on_broken = on_broken
        self._max_frame_bytes = max_frame_bytes
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes
        self._conn: _Connection | None = None
        """The connection whose handshake is done: messages go straight out on it."""
        self._handshaking: _Connection | None = None
        """Connected, waiting for the peer's READY: a message sent before it is a protocol error
        to libzmq, which reads it as a handshake command and drops the connection."""
        self._waiting: list[bytes] = []
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    def send(self, frames: list[bytes]) -> None:
        """Send one message now, or once the handshake is done; QueueFull when too much waits."""
        conn = self._conn
        if conn is not None:
            if conn.queued() > self._max_queued_bytes:
                raise QueueFull(f"{conn.queued()} bytes wait for the peer")
            conn.write(encode_message(frames))
            return
        if self._closed:
            raise QueueFull("the socket is closed")
        if len(self._waiting) >= self._max_queued:
            raise QueueFull(f"{len(self._waiting)} messages wait for a connection")
        self._waiting.append(encode_message(frames))
        if self._connecting is None and self._handshaking is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def close(self) -> None:
        """Drop the connection and anything waiting for it; safe to call twice."""
        self._closed = True
        self._waiting.clear()
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        for conn in (self._conn, self._handshaking):
            if conn is not None:
                conn.abort()
        self._conn = self._handshaking = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self, "DEALER", self._max_frame_bytes, HANDSHAKE_S),
                self._host,
                self._port,
            )
        except OSError as exc:
            self._connecting = None
            self._waiting.clear()
            self._broken(f"cannot connect to {self._host}:{self._port}: {exc.strerror or exc}")
            return
        self._connecting = None
        if self._closed:
            conn.abort()
            return
        self._handshaking = conn  # the waiting messages go once the peer's READY is in

    def _broken(self, why: str) -> None:
        if self._on_broken is not None and not self._closed:
            self._on_broken(why)

    def _ready(self, conn: _Connection, peer: Ready) -> None:
        if conn is not self._handshaking:
            return
        self._handshaking, self._conn = None, conn
        for data in self._waiting:
            conn.write(data)
        self._waiting.clear()

    def _message(self, conn: _Connection, frames: list[bytes]) -> None:
        self._on_frames(frames)

    def _refused(self, conn: _Connection, error: ZmtpError) -> None:
        log.debug("peer %s:%d sent what is not ZMTP: %s", self._host, self._port, error)

    def _lost(self, conn: _Connection) -> None:
        if conn is self._conn or conn is self._handshaking:
            self._conn = self._handshaking = None
            self._waiting.clear()
            self._broken(f"the connection to {self._host}:{self._port} was lost")
