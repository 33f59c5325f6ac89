"""The byte movers: length-prefixed frames, one port for UDP and TCP, the stream exchange."""

from __future__ import annotations

import asyncio
import socket

import pytest

from cluster.errors import MalformedPacket, OversizedPacket
from cluster.messages import Address
from cluster.udp import frame, open_endpoints, read_frame, stream_exchange


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_frames_are_read_back_in_order_until_a_clean_end() -> None:
    r = _reader(frame(b"one") + frame(b"") + frame(b"three"))
    assert [await read_frame(r, 100) for _ in range(4)] == [b"one", b"", b"three", None]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (frame(b"abc")[:2], MalformedPacket),
        (frame(b"abc")[:-1], MalformedPacket),
        (frame(b"x" * 101), OversizedPacket),
    ],
    ids=["cut-header", "cut-body", "over-limit"],
)
async def test_bad_frames_raise_the_peer_error(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        await read_frame(_reader(data), 100)


async def test_udp_and_tcp_share_one_port_and_carry_bytes() -> None:
    got: list[tuple[bytes, Address]] = []
    arrived = asyncio.Event()

    def on_datagram(data: bytes, src: Address) -> None:
        got.append((data, src))
        arrived.set()

    async def on_stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_frame(r, 1000)
        assert req is not None
        w.write(frame(req.upper()) + frame(b"second"))
        await w.drain()
        w.close()

    ep = await open_endpoints("127.0.0.1", 0, on_datagram, on_stream)
    try:
        assert ep.addr[1] > 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.sendto(b"hello", ep.addr)
            await asyncio.wait_for(arrived.wait(), 5)
            assert got == [(b"hello", s.getsockname())]
        replies: list[bytes] = []
        n = await stream_exchange(ep.addr, b"ping", 1000, 5.0, replies.append)
        assert replies == [b"PING", b"second"]
        assert n == 4 + 4 + 4 + 6
    finally:
        await ep.close()


async def test_a_stream_exchange_with_nobody_listening_raises_oserror() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        addr = s.getsockname()  # bound, not listening: connection refused
        with pytest.raises(OSError):
            await stream_exchange(addr, b"x", 100, 2.0, lambda _: None)
