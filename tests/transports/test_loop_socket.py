"""LoopSocket: a ZMQ socket read from the event loop's descriptor callback."""

from __future__ import annotations

import asyncio
import os

import zmq

from tests.support import wait_for
from transports.loop_socket import LoopSocket


async def test_messages_arrive_in_order_and_a_reply_sent_meanwhile_is_not_missed() -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    got: list[bytes] = []
    done = asyncio.Event()

    def on_frames(frames: list[bytes]) -> None:
        got.append(frames[0])
        if len(got) == 200:
            done.set()

    left = LoopSocket(b, on_frames)  # the connecting side queues before the link is up
    right = LoopSocket(a, lambda frames: right.send(frames))  # an echo
    try:
        for i in range(200):
            left.send([str(i).encode()])  # each send may hide the echo's arrival
        await asyncio.wait_for(done.wait(), 10)
        assert got == [str(i).encode() for i in range(200)]
    finally:
        left.close()
        right.close()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_closing_twice_leaves_alone_whatever_reuses_the_descriptor_number() -> None:
    # Listening first, so the freed number goes to a connection (a transport), not to this.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PAIR)
    pump = LoopSocket(sock, lambda frames: None)
    fd = int(sock.getsockopt(zmq.FD))
    pump.close()
    # ZMQ's reaper thread closes the socket's descriptor a moment later: wait for it.
    await wait_for(lambda: not fd_open(fd), timeout=5, what="ZMQ closing the socket's descriptor")
    streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    try:
        # POSIX hands out the lowest free number, so one of these connections (either end)
        # now owns `fd`; a second close must neither raise nor touch that transport's reader.
        assert fd_open(fd)
        pump.close()
        for _, writer in streams:
            assert not writer.is_closing()
    finally:
        for _, writer in streams:
            writer.close()
        server.close()
        await server.wait_closed()
