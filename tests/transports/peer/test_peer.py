"""Peer RPC over real ZMQ sockets on loopback, against a small in-memory handler."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from actors.errors import InvalidRequest, ModelNotFound, Overloaded
from actors.types import (
    EmbedRequest,
    EmbedResult,
    InferResult,
    LoadRequest,
    TokenChunk,
)
from tests.support import wait_for
from tests.transports.peer.fakes import (
    CLIENT,
    KEY,
    OTHER_KEY,
    SERVER,
    FakePeerHandler,
    RawRequester,
    at,
    dropped,
    env,
    req,
    signed,
    silent_at,
)
from transports.peer import PeerAddress, PeerClient, PeerServer
from transports.peer.server import ACK_GRACE_FRACTION
from transports.peer_wire import (
    PEER_PROTOCOL,
    Envelope,
    Kind,
    Op,
    PeerUnavailable,
    embed_to_wire,
    request_to_wire,
    result_from_wire,
    seal,
)


async def test_an_inference_round_trips(served: tuple[FakePeerHandler, PeerServer, PeerClient]) -> None:
    _, server, client = served
    result = await client.infer(at(server), req(text="echo"), timeout=5)
    assert result.text == "echo" and result.model_version == "v1"
    assert await client.ping(at(server)) < 1.0


async def test_a_stream_arrives_piece_by_piece(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    _, server, client = served
    items = [i async for i in client.stream(at(server), req(), timeout=5)]
    assert [i.text for i in items if isinstance(i, TokenChunk)] == ["t0 ", "t1 ", "t2 "]
    assert isinstance(items[-1], InferResult)


async def test_errors_come_back_as_the_same_domain_errors(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    _, server, client = served
    address = at(server)
    with pytest.raises(ModelNotFound, match="not here"):
        await client.infer(address, req("other"), timeout=5)
    with pytest.raises(Overloaded) as overloaded:
        await client.infer(address, req("busy"), timeout=5)
    assert overloaded.value.retry_after == 3.0
    with pytest.raises(InvalidRequest) as invalid:
        await client.infer(address, req(max_tokens=500), timeout=5)
    assert invalid.value.field == "max_tokens"


async def test_closing_a_stream_cancels_the_work_on_the_peer(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    handler, server, client = served
    stream = client.stream(at(server), req("slow"), timeout=5)
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.wait_for(handler.closed.wait(), 5)


async def test_a_load_carries_the_primarys_term(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    handler, server, client = served
    await client.load(at(server), LoadRequest(name="x"), term=7, timeout=5)
    assert handler.loads == [("x", 7)]
    assert await client.place(at(server), "m", timeout=5) == "holder-of-m"


async def test_a_dead_peer_is_reported_unavailable_quickly() -> None:
    client = PeerClient(KEY, name=CLIENT, ack_timeout=0.3)
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as hole:
        port = hole.bind_to_random_port("tcp://127.0.0.1")  # bound, never answers
        began = time.monotonic()
        with pytest.raises(PeerUnavailable):
            await client.infer(silent_at(port), req(), timeout=5)
        assert time.monotonic() - began < 2.0
    client.close()


@pytest.mark.parametrize(
    ("reason", "frames"),
    [
        ("unauthenticated", lambda: seal(OTHER_KEY, env(Op.PING, "a", time.time()))),
        ("unauthenticated", lambda: [seal(KEY, env(Op.PING, "b", time.time()))[0], b""]),
        ("stale", lambda: seal(KEY, env(Op.PING, "c", time.time() - 3600))),
        ("malformed", lambda: [b"\xc1garbage", KEY.sign(b"\xc1garbage")]),
        ("malformed", lambda: [b"one frame only"]),
        ("misdirected", lambda: seal(KEY, Envelope(Op.PING, "d", time.time(), None,
                                                   src=CLIENT, dst="node-c"))),
        ("version", lambda: signed({"v": 1, "c": 1, "id": "e", "ts": time.time(), "b": None,
                                    "t": None})),
        ("malformed", lambda: signed({"v": PEER_PROTOCOL, "c": 1, "id": "f", "ts": time.time(),
                                      "b": None, "t": None})),
    ],
    ids=["wrong-key", "unsigned", "replayed-stale", "not-msgpack", "wrong-frame-count",
         "sealed-for-another-node", "previous-protocol", "no-sender-or-destination"],
)  # fmt: skip
async def test_forged_stale_and_malformed_frames_are_counted_and_dropped(
    served: tuple[FakePeerHandler, PeerServer, PeerClient], reason: str, frames: object
) -> None:
    _, server, client = served
    before = dropped(reason)
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{server.port}")
    await sock.send_multipart(frames())  # type: ignore[operator]
    await wait_for(lambda: dropped(reason) > before, timeout=5, what=f"a {reason} drop counted")
    assert not await sock.poll(100)  # and nothing was answered
    sock.close(linger=0)
    # the server keeps serving
    assert (await client.infer(at(server), req(), timeout=5)).text == "hi"


async def test_an_answer_ready_within_the_grace_is_sent_without_an_ack(
    raw: RawRequester,
) -> None:
    await raw.send("m", ack_s=2.0)
    first = await raw.reply()
    assert first.code == Kind.RESULT  # one message, no ack before it
    assert result_from_wire(first.body).text == "hi"
    assert await raw.silent()  # and no late ack after it


async def test_an_answer_not_ready_within_the_grace_is_acknowledged_first(
    served: tuple[FakePeerHandler, PeerServer, PeerClient], raw: RawRequester
) -> None:
    handler = served[0]
    began = time.monotonic()
    await raw.send("held", ack_s=0.5)
    ack = await raw.reply()
    assert ack.code == Kind.ACK and ack.request_id == "r1"
    assert time.monotonic() - began >= 0.5 * ACK_GRACE_FRACTION  # held back for the grace
    handler.release.set()
    result = await raw.reply()
    assert result.code == Kind.RESULT and result_from_wire(result.body).text == "released"


async def test_a_requester_that_names_no_ack_timeout_is_acknowledged_at_once(
    raw: RawRequester,
) -> None:
    await raw.send("m", ack_s=None)  # as a peer of an older version sends it
    assert (await raw.reply()).code == Kind.ACK
    assert (await raw.reply()).code == Kind.RESULT


async def test_a_load_is_acknowledged_at_once_whatever_the_requester_waits(
    raw: RawRequester,
) -> None:
    await raw.send("x", ack_s=2.0, op=Op.LOAD)  # loads take seconds: no grace for them
    assert (await raw.reply()).code == Kind.ACK
    assert (await raw.reply()).code == Kind.RESULT


async def test_a_slow_answer_outlasts_the_ack_timeout_once_acknowledged(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    handler, server, _ = served
    client = PeerClient(KEY, name=CLIENT, ack_timeout=0.3)
    try:
        call = asyncio.create_task(client.infer(at(server), req("held"), 10))
        done, _ = await asyncio.wait({call}, timeout=1.0)  # over three ack timeouts
        assert not done, "the acknowledged request was given up"
        handler.release.set()
        assert (await call).text == "released"
    finally:
        client.close()


async def test_many_requests_in_flight_on_one_connection_all_get_their_own_answers(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    # More than one read batch, with sends and arrivals interleaved on both sockets: a wake-up
    # lost between a send and a read would leave some of these waiting forever.
    _, server, client = served
    address = at(server)
    texts = [f"q{i}" for i in range(300)]
    results = await asyncio.wait_for(
        asyncio.gather(*(client.infer(address, req(text=t), timeout=10) for t in texts)), 30
    )
    assert [r.text for r in results] == texts
    pings = await asyncio.wait_for(asyncio.gather(*(client.ping(address) for _ in range(100))), 30)
    assert len(pings) == 100


def served_count(op: str, outcome: str) -> float:
    labels = {"op": op, "outcome": outcome}
    return REGISTRY.get_sample_value("moc_peer_requests_total", labels) or 0.0


async def answer(raw: RawRequester, op: Op, body: object) -> Envelope:
    """Send a signed request with `body`; return its answer (after an ACK, if one comes)."""
    await raw.sock.send_multipart(seal(KEY, env(op, "r1", time.time(), body)))
    reply = await raw.reply()
    return await raw.reply() if reply.code == Kind.ACK else reply


async def test_a_signed_request_with_a_nonsense_body_is_an_invalid_request_not_a_crash(
    served: tuple[FakePeerHandler, PeerServer, PeerClient], raw: RawRequester
) -> None:
    before = served_count("infer", "malformed")
    reply = await answer(raw, Op.INFER, {"model": "m"})
    assert reply.code == Kind.ERROR
    assert reply.body["code"] == "invalid_request"
    assert "bad inference request" in reply.body["message"]
    assert served_count("infer", "malformed") == before + 1
    _, server, client = served
    assert (await client.infer(at(server), req(), timeout=5)).text == "hi"


async def test_requests_in_flight_to_a_silent_peer_all_fail_unavailable_and_nothing_else() -> None:
    silent = zmq.asyncio.Context.instance().socket(zmq.ROUTER)  # takes requests, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = PeerClient(KEY, name=CLIENT, ack_timeout=0.3)
    try:
        address = silent_at(port)
        outcomes = await asyncio.gather(
            *(client.infer(address, req(), timeout=5) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(o, PeerUnavailable) for o in outcomes), outcomes
        # The connection was dropped once and a new one is made for the next call.
        with pytest.raises(PeerUnavailable):
            await client.infer(address, req(), timeout=5)
    finally:
        client.close()
        silent.close(linger=0)


async def test_a_request_cancelled_before_its_task_starts_leaves_nothing_behind(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    # Both frames handled in one go, as one descriptor callback may: the task is cancelled
    # before its first step, so only the CANCEL's own bookkeeping can forget it.
    _, server, client = served
    now = time.time()
    held = env(Op.INFER, "r1", now, request_to_wire(req("held")), None, 2.0)
    server._on_frames([b"requester", *seal(KEY, held)])
    server._on_frames([b"requester", *seal(KEY, env(Op.CANCEL, "r1", now))])
    assert server.serving() == 0 and not server._acks  # no task kept, no ack timer left to fire
    # and the server goes on answering
    assert (await client.infer(at(server), req(), timeout=5)).text == "hi"
    assert server.serving() == 0 and not server._acks


async def test_a_request_in_flight_when_the_peer_goes_away_fails_at_once(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    # Its answer could only come back on the connection that broke: no timeout to wait out.
    _, server, client = served
    call = asyncio.create_task(client.infer(at(server), req("held"), 30))
    await wait_for(
        lambda: server.serving() == 1 or call.done(), timeout=5, what="the peer holds it"
    )
    assert not call.done()
    began = time.monotonic()
    await server.stop()
    with pytest.raises(PeerUnavailable, match="lost"):
        await asyncio.wait_for(call, 5)
    assert time.monotonic() - began < 1.0


async def test_a_peer_nobody_listens_for_is_unavailable_before_the_ack_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = PeerClient(KEY, name=CLIENT, ack_timeout=5.0)
    try:
        began = time.monotonic()
        with pytest.raises(PeerUnavailable, match="cannot connect"):
            await client.infer(silent_at(port), req(), timeout=10)
        assert time.monotonic() - began < 1.0
    finally:
        client.close()


@pytest.mark.parametrize("address", ["no-port", "host:", ":7213", "host:http", "host:70000"])
async def test_a_peer_address_that_is_not_host_port_is_unavailable_not_a_crash(
    address: str,
) -> None:
    # Addresses come from gossip; the forwarder moves on to the next holder on PeerUnavailable.
    client = PeerClient(KEY, name=CLIENT, ack_timeout=1.0)
    try:
        with pytest.raises(PeerUnavailable, match="is not host:port"):
            await client.infer(PeerAddress(SERVER, address), req(), timeout=5)
    finally:
        client.close()


async def test_an_embedding_round_trips_with_text_and_token_inputs(
    served: tuple[FakePeerHandler, PeerServer, PeerClient],
) -> None:
    _, server, client = served
    embed = EmbedRequest("m", ("hello", (1, 2, 3)), timeout_s=4.0)
    result = await client.embed(at(server), embed, timeout=5)
    assert result == EmbedResult((b"hello", b"\x01\x02\x03"), 2, 1.5, "v1")
    with pytest.raises(ModelNotFound):
        await client.embed(at(server), EmbedRequest("other", ("x",)), timeout=5)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "inputs": "hello"},  # a string, not a list of inputs
        {"model": "m", "inputs": []},
        {"model": "m", "inputs": [""]},
        {"model": "m", "inputs": [[1, True]]},
        {"model": 7, "inputs": ["x"]},
        {"model": "m", "inputs": ["x"], "timeout_s": -1},
        ["m", ["x"]],
    ],
    ids=["no inputs", "inputs a string", "no input", "an empty input", "a boolean token",
         "model a number", "a negative timeout", "not a map"],
)  # fmt: skip
async def test_a_signed_embed_request_with_a_malformed_body_is_refused_and_counted(
    served: tuple[FakePeerHandler, PeerServer, PeerClient], raw: RawRequester, body: object
) -> None:
    handler, server, client = served
    before = served_count("embed", "malformed")
    reply = await answer(raw, Op.EMBED, body)
    assert reply.code == Kind.ERROR
    assert reply.body["code"] == "invalid_request"
    assert "bad embeddings request" in reply.body["message"]
    assert served_count("embed", "malformed") == before + 1
    assert ("embed", "m") not in handler.calls  # refused before the model was asked
    result = await client.embed(at(server), EmbedRequest("m", ("x",)), timeout=5)
    assert result.vectors == (b"x",)  # and the server keeps serving


async def test_a_well_formed_embed_request_sent_raw_is_answered_without_an_ack(
    raw: RawRequester,
) -> None:
    body = embed_to_wire(EmbedRequest("m", ("hi",)))
    await raw.sock.send_multipart(seal(KEY, env(Op.EMBED, "r1", time.time(), body, None, 2.0)))
    first = await raw.reply()
    assert first.code == Kind.RESULT  # answered within the grace: no ack before it
    assert first.body["vectors"] == [b"hi"]
