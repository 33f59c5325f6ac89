"""Peer RPC replay defence: a captured frame is taken once, by the node it was sealed for."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
import zmq.asyncio

from actors.types import (
    LoadRequest,
)
from tests.support import wait_for
from tests.transports.peer.fakes import (
    CLIENT,
    KEY,
    SERVER,
    FakePeerHandler,
    RawRequester,
    dropped,
    env,
    req,
    silent_at,
)
from transports.peer import PeerClient, PeerServer
from transports.peer_wire import (
    Envelope,
    Kind,
    Op,
    PeerUnavailable,
    load_to_wire,
    open_frames,
    request_to_wire,
    seal,
)


async def outsider_sends(port: int, frames: list[bytes]) -> bool:
    """Send captured frames from a connection of its own; return whether anything came back."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        await sock.send_multipart(frames)
        return bool(await sock.poll(200))
    finally:
        sock.close()


async def until_counted(reason: str, before: float) -> None:
    await wait_for(lambda: dropped(reason) > before, timeout=5, what=f"a {reason} drop counted")


LOAD_BODY = load_to_wire(LoadRequest(name="x"))


@pytest.mark.parametrize(
    ("op", "body", "call"),
    [
        (Op.LOAD, LOAD_BODY, ("load", "x")),
        (Op.PLACE, "m", ("place", "m")),
        (Op.INFER, request_to_wire(req()), ("infer", "m")),
    ],
    ids=["load", "place", "infer"],
)
async def test_a_captured_request_sent_again_is_dropped_as_a_replay_and_not_carried_out_again(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
    raw: RawRequester,
    op: Op,
    body: object,
    call: tuple[str, str],
) -> None:
    handler, server, _ = served
    captured = seal(KEY, env(op, "r1", time.time(), body, 3, 2.0))
    await raw.sock.send_multipart(captured)
    replies = [await raw.reply()]
    while replies[-1].code == Kind.ACK:
        replies.append(await raw.reply())
    assert replies[-1].code == Kind.RESULT and handler.calls == [call]

    before = dropped("replay")
    assert not await outsider_sends(server.port, captured)  # never answered
    await until_counted("replay", before)
    await raw.sock.send_multipart(captured)  # nor on the requester's own connection
    await until_counted("replay", before + 1)
    assert await raw.silent()
    assert handler.calls == [call]  # carried out once


async def test_a_request_sealed_for_one_node_is_refused_by_another(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    handler, b, _ = served
    c = PeerServer(handler, KEY, name="node-c", host="127.0.0.1", port=0)
    await c.start()
    try:
        for_b = seal(KEY, env(Op.LOAD, "r1", time.time(), LOAD_BODY, 3))
        before = dropped("misdirected")
        assert not await outsider_sends(c.port, for_b)
        await until_counted("misdirected", before)
        assert handler.calls == []
    finally:
        await c.stop()


async def test_a_frame_sealed_before_the_server_started_is_refused_as_a_possible_replay() -> None:
    # Its previous incarnation may have taken it, and that window is gone with it.
    captured = seal(KEY, env(Op.LOAD, "r1", time.time(), LOAD_BODY, 3))
    handler = FakePeerHandler()
    server = PeerServer(handler, KEY, name=SERVER, host="127.0.0.1", port=0)
    await server.start()
    try:
        before = dropped("replay")
        assert not await outsider_sends(server.port, captured)
        await until_counted("replay", before)
        assert handler.calls == []
    finally:
        await server.stop()


async def test_a_reply_not_sealed_for_the_client_is_dropped_and_the_request_fails_unavailable() -> (
    None
):
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = PeerClient(KEY, name=CLIENT, ack_timeout=0.5)
    try:
        call = asyncio.create_task(client.infer(silent_at(port), req(), timeout=5))
        ident, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
        request = open_frames(KEY, frames, time.time(), dst=SERVER, src=CLIENT)
        before = dropped("misdirected")
        for_another = Envelope(Kind.RESULT, request.request_id, time.time(), None,
                               src=SERVER, dst="node-c")  # fmt: skip
        await router.send_multipart([ident, *seal(KEY, for_another)])
        with pytest.raises(PeerUnavailable):
            await call
        assert dropped("misdirected") == before + 1
    finally:
        client.close()
        router.close()
