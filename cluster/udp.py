"""Sockets for the gossip: one UDP socket and one TCP listener on the same port (asyncio).

This module only moves bytes. Datagrams go to `on_datagram(data, addr)`; a TCP connection
carries length-prefixed frames (4-byte big-endian length, then a codec packet): the opener sends
one request frame, the listener answers with zero or more frames and closes. What the bytes mean
is the runner's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from cluster.errors import MalformedPacket, OversizedPacket
from cluster.messages import Address

__all__ = [
    "FRAME_HEADER_BYTES",
    "DatagramHandler",
    "Endpoints",
    "frame",
    "open_endpoints",
    "peer_address",
    "read_frame",
    "stream_exchange",
    "StreamHandler",
]

FRAME_HEADER_BYTES = 4

DatagramHandler = Callable[[bytes, Address], None]
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def frame(packet: bytes) -> bytes:
    """Return `packet` behind its length prefix."""
    return len(packet).to_bytes(FRAME_HEADER_BYTES, "big") + packet


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """Read one frame; return None on a clean end of stream before a header.

    Raise OversizedPacket before reading a body longer than `limit`, MalformedPacket when the
    stream ends inside a frame.
    """
    try:
        head = await reader.readexactly(FRAME_HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise MalformedPacket("stream ended inside a frame header") from None
    n = int.from_bytes(head, "big")
    if n > limit:
        raise OversizedPacket(f"frame of {n} bytes > {limit}")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise MalformedPacket("stream ended inside a frame") from None


def peer_address(writer: asyncio.StreamWriter) -> Address:
    """Return the (host, port) of a stream's far end."""
    info = writer.get_extra_info("peername")
    return str(info[0]), int(info[1])


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, handler: DatagramHandler) -> None:
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.handler(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a dead peer surfaces here: nothing to do, SWIM copes.
        pass


class Endpoints:
    """The bound UDP transport and TCP server of one node."""

    def __init__(
        self, datagrams: asyncio.DatagramTransport, server: asyncio.Server, addr: Address
    ) -> None:
        self.datagrams = datagrams
        self.server = server
        self.addr = addr
        """The (host, port) both sockets are bound to."""

    def sendto(self, data: bytes, addr: Address) -> None:
        """Send one datagram (best effort: a full buffer or an unreachable peer is ignored)."""
        self.datagrams.sendto(data, addr)

    async def close(self) -> None:
        """Close both sockets."""
        self.datagrams.close()
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1.0)


async def open_endpoints(
    host: str, port: int, on_datagram: DatagramHandler, on_stream: StreamHandler
) -> Endpoints:
    """Bind UDP and TCP on host:port; with port 0, find a port free for both."""
    loop = asyncio.get_running_loop()
    attempts = 20 if port == 0 else 1
    last: OSError | None = None
    for _ in range(attempts):
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Datagrams(on_datagram), local_addr=(host, port)
        )
        bound = transport.get_extra_info("sockname")
        addr: Address = (str(bound[0]), int(bound[1]))
        try:
            server = await asyncio.start_server(
                on_stream, host, addr[1], family=_family(host), reuse_address=True
            )
        except OSError as exc:  # the TCP twin of an ephemeral UDP port is taken: try another
            transport.close()
            last = exc
            continue
        return Endpoints(transport, server, addr)
    assert last is not None
    raise last


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def stream_exchange(
    addr: Address,
    request: bytes,
    limit: int,
    timeout: float,
    on_reply: Callable[[bytes], None],
) -> int:
    """Send one frame to addr over a new TCP connection and feed each reply frame to on_reply.

    Return the bytes received. Raise OSError / TimeoutError on connection trouble and the
    framing errors of `read_frame`.
    """
    received = 0
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        try:
            writer.write(frame(request))
            await writer.drain()
            while (data := await read_frame(reader, limit)) is not None:
                received += FRAME_HEADER_BYTES + len(data)
                on_reply(data)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return received
