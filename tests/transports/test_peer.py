"""Peer RPC over real ZMQ sockets on loopback, against a small in-memory handler."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from actors.errors import InvalidRequest, ModelNotFound, Overloaded
from actors.types import (
    GenerationParams,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from cluster.keyring import Keyring
from tests.support import wait_for
from transports.peer import PeerAddress, PeerClient, PeerServer
from transports.peer.server import ACK_GRACE_FRACTION
from transports.peer_wire import (
    PEER_PROTOCOL,
    Envelope,
    Kind,
    Op,
    PeerUnavailable,
    load_to_wire,
    open_frames,
    request_to_wire,
    result_from_wire,
    seal,
)

KEY = Keyring((b"k" * 32,))
OTHER_KEY = Keyring((b"x" * 32,))
SERVER = "node-b"
CLIENT = "node-a"


def at(server: PeerServer) -> PeerAddress:
    return PeerAddress(server.name, f"127.0.0.1:{server.port}")


def silent_at(port: int) -> PeerAddress:
    """A peer at `port` that is not a PeerServer (silent, or nobody listening)."""
    return PeerAddress(SERVER, f"127.0.0.1:{port}")


def env(code: int, rid: str, ts: float, body: object = None, *args: object) -> Envelope:
    """A request from CLIENT sealed for SERVER."""
    return Envelope(code, rid, ts, body, *args, src=CLIENT, dst=SERVER)  # type: ignore[arg-type]


class FakePeerHandler:
    """Serves model "m"; "slow" streams until cancelled; "held" answers when released; anything
    else is not found."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.release = asyncio.Event()
        self.loads: list[tuple[str, int | None]] = []
        self.calls: list[tuple[str, str]] = []
        """(operation, model) of every request the handler was asked to carry out."""

    async def peer_infer(self, req: InferRequest) -> InferResult:
        self.calls.append(("infer", req.model))
        if req.model == "held":  # answers only once the test releases it
            await self.release.wait()
            return InferResult("released", 1, 1, "length", 1.0, "v1")
        if req.model == "busy":
            raise Overloaded("model 'busy' is overloaded", retry_after=3.0)
        if req.params.max_tokens > 100:
            raise InvalidRequest("max_tokens", "too many")
        if req.model != "m":
            raise ModelNotFound(f"model {req.model!r} is not here")
        return InferResult(req.prompt or "", 1, 1, "length", 1.0, "v1")

    async def peer_infer_stream(
        self, req: InferRequest
    ) -> AsyncGenerator[TokenChunk | InferResult, None]:
        try:
            for i in range(1_000_000 if req.model == "slow" else 3):
                yield TokenChunk(f"t{i} ")
                await asyncio.sleep(0)
            yield InferResult("t0 t1 t2 ", 3, 1, "length", 1.0, "v1")
        finally:
            self.closed.set()

    async def peer_place(self, model: str) -> str:
        self.calls.append(("place", model))
        return f"holder-of-{model}"

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo:
        self.calls.append(("load", req.name))
        self.loads.append((req.name, term))
        return ModelInfo(name=req.name, backend="gguf", path="/m", state="loaded")


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakePeerHandler, PeerServer, PeerClient]]:
    handler = FakePeerHandler()
    server = PeerServer(handler, KEY, name=SERVER, host="127.0.0.1", port=0)
    await server.start()
    client = PeerClient(KEY, name=CLIENT, ack_timeout=2.0)
    yield handler, server, client
    client.close()
    await server.stop()


def req(model: str = "m", text: str = "hi", max_tokens: int = 5) -> InferRequest:
    return InferRequest(model=model, prompt=text, params=GenerationParams(max_tokens=max_tokens))


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


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("moc_peer_messages_dropped_total", {"reason": reason}) or 0.0


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


def signed(fields: dict[str, object]) -> list[bytes]:
    """Frames of a payload built by hand (a shape `seal` does not make), signed with KEY."""
    payload = msgpack.packb(fields, use_bin_type=True)
    return [payload, KEY.sign(payload)]


class RawRequester:
    """A bare DEALER socket: sends one request, reads the peer's replies frame by frame."""

    def __init__(self, port: int) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    async def send(self, model: str, ack_s: float | None, op: Op = Op.INFER) -> None:
        body = (
            load_to_wire(LoadRequest(name=model)) if op == Op.LOAD else request_to_wire(req(model))
        )
        await self.sock.send_multipart(seal(KEY, env(op, "r1", time.time(), body, 1, ack_s)))

    async def reply(self, timeout: float = 5.0) -> Envelope:
        assert await self.sock.poll(int(timeout * 1000)), "no reply"
        frames = await self.sock.recv_multipart()
        return open_frames(KEY, frames, time.time(), dst=CLIENT, src=SERVER)

    async def silent(self) -> bool:
        return not await self.sock.poll(100)


@pytest.fixture
async def raw(served: tuple[FakePeerHandler, PeerServer, PeerClient]) -> AsyncIterator[RawRequester]:
    requester = RawRequester(served[1].port)
    yield requester
    requester.sock.close(linger=0)


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


async def test_a_signed_request_with_a_nonsense_body_is_an_invalid_request_not_a_crash(
    served: tuple[FakePeerHandler, PeerServer, PeerClient], raw: RawRequester
) -> None:
    await raw.sock.send_multipart(seal(KEY, env(Op.INFER, "r1", time.time(), {"model": "m"})))
    reply = await raw.reply()
    if reply.code == Kind.ACK:
        reply = await raw.reply()
    assert reply.code == Kind.ERROR
    assert reply.body["code"] == "invalid_request"
    assert "bad inference request" in reply.body["message"]
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


# ---- replay defence ------------------------------------------------------------------------


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
