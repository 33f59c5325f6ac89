"""Peer RPC: how nodes forward requests to each other (ZMQ ROUTER server, DEALER clients).

The sockets speak ZMTP, ZeroMQ's wire protocol, from the event loop (transports/zmtp_sockets.py),
so a libzmq DEALER or ROUTER is still a peer; see that module for why not through libzmq.

A caller must hear from the peer within its `ack_timeout`, so it can tell "the peer is down"
(silence: try another holder) from "the peer is working on it". The request carries that
timeout; for an inference the peer answers straight away when the answer is ready within a
fraction of it (one message, not an ack and then the answer: most forwarded requests), and sends
an ACK only when it is not; loads and placements are acknowledged at once. Streams send one
TOKEN frame per piece and end with RESULT or ERROR; a CANCEL stops the peer's generation. Frames
that fail authentication, are stale, malformed, sealed for another node (`misdirected`) or
replayed (a request id the server's replay window has taken before: `replay`) are counted and
dropped, never answered. A request whose connection breaks fails at once (PeerUnavailable): its
answer could not come back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import Counter

from actors.errors import InvalidRequest
from actors.types import InferRequest, InferResult, LoadRequest, ModelInfo, TokenChunk
from cluster.keyring import Keyring
from transports.peer_wire import (
    MAX_SKEW_S,
    Envelope,
    Kind,
    Op,
    PeerUnavailable,
    PeerWireError,
    error_from_wire,
    error_to_wire,
    load_from_wire,
    load_to_wire,
    open_frames,
    request_from_wire,
    request_to_wire,
    result_from_wire,
    result_to_wire,
    seal,
    token_from_wire,
)
from transports.replay_window import DEFAULT_CAPACITY, ReplayWindow
from transports.zmtp_sockets import DealerSocket, QueueFull, RouterSocket

log = logging.getLogger(__name__)

peer_requests_total = Counter(
    "moc_peer_requests_total",
    "Peer RPC requests served, by operation and outcome",
    ["op", "outcome"],
)
peer_dropped_total = Counter(
    "moc_peer_messages_dropped_total", "Peer RPC frames refused, by reason", ["reason"]
)

_served: dict[tuple[Op, str], Any] = {}
"""Counter children by (operation, outcome): `labels()` costs more than the increment."""


def _count_served(op: Op, outcome: str) -> None:
    child = _served.get((op, outcome))
    if child is None:
        child = _served[op, outcome] = peer_requests_total.labels(op.name.lower(), outcome)
    child.inc()


_OPS = {int(op): op for op in Op}

WARN_EVERY_S = 60.0
"""Refusals that point at a misconfigured cluster (another protocol version, frames sealed for
another node) are logged as warnings at most this often; every one is counted."""

ACK_GRACE_FRACTION = 0.2
"""Of the requester's ack timeout: how long the peer holds back the ACK, hoping to send the
answer instead. The rest of the timeout is margin for a busy event loop and the network."""


K = TypeVar("K", bound=Hashable)


class _Deadlines(Generic[K]):
    """Keys due at a delay from now; `expire(key)` is called for each once it is due.

    One loop timer at a time, armed only when no earlier one is: a timer per request
    (`call_later`) is nearly always cancelled unused, the answer coming long before, yet costs
    ~40 us with cold caches (the first request after a quiet spell). Here a request costs a
    dict entry.
    """

    def __init__(self, expire: Callable[[K], None]) -> None:
        self._expire = expire
        self._due: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: K, delay: float) -> None:
        loop = asyncio.get_running_loop()
        when = self._due[key] = loop.time() + delay
        if when < self._timer_at or self._timer_loop is not loop:
            self._arm(loop, when)  # (a timer armed in another loop would never fire here)

    def discard(self, key: K) -> None:
        self._due.pop(key, None)

    def close(self) -> None:
        """Forget every key and the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._due.clear()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._fire, loop), when
        self._timer_loop = loop

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now = loop.time()
        for key in [k for k, when in self._due.items() if when <= now]:
            del self._due[key]
            try:
                self._expire(key)
            except Exception:  # one failure must not strand the keys due after it
                log.exception("a peer RPC deadline could not be handled")
        if self._due:
            self._arm(loop, min(self._due.values()))


class PeerHandler(Protocol):
    """What a node does for its peers: serve locally (never forward again: one hop at most)."""

    async def peer_infer(self, req: InferRequest) -> InferResult: ...

    def peer_infer_stream(
        self, req: InferRequest
    ) -> AsyncGenerator[TokenChunk | InferResult, None]: ...

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo: ...

    async def peer_place(self, model: str) -> str:
        """As the primary: make sure `model` is loaded somewhere; return the holder's name."""
        ...

    async def peer_restore(self, model: str, node: str) -> str:
        """As the primary: say which node `model`, remembered by restarting `node`, belongs to."""
        ...


MAX_ZMTP_FRAME_BYTES = 16 * 1024 * 1024
"""A ZMTP frame larger than this drops its connection (libzmq's MAXMSGSIZE, as set before)."""


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """A peer: its node name (requests are sealed for it) and where it listens."""

    node: str
    address: str
    """host:port, or [v6 host]:port, as the peer gossips it."""

    def __str__(self) -> str:
        return f"{self.node} ({self.address})"


def _split_address(address: str) -> tuple[str, int]:
    """Return (host, port) of "host:port" or "[v6 host]:port"; PeerUnavailable if it is not.

    Addresses come from peers' gossiped metadata: a bad one makes that peer unreachable, and
    the caller moves on to the next holder.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PeerUnavailable(f"peer address {address!r} is not host:port")
    return host, int(port)


_TaskKey = tuple[bytes, str, str]
"""(connection identity, requester's node name, request id)."""


class PeerServer:
    """Serve peer requests on tcp://host:port until stopped."""

    def __init__(
        self,
        handler: PeerHandler,
        keyring: Keyring,
        *,
        name: str,
        host: str,
        port: int,
        clock: Callable[[], float] = time.time,
        replay_capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self.name = name
        """This node's name: requests sealed for any other node are refused."""
        self._handler = handler
        self._keyring = keyring
        self._host = host
        self._clock = clock
        self._router: RouterSocket | None = None
        # Keyed by (connection, requester, request id): a request's task and its owed ack.
        self._tasks: dict[_TaskKey, asyncio.Task[None]] = {}
        self._acks: _Deadlines[_TaskKey] = _Deadlines(self._ack)
        # Floored at creation: a frame sealed before this server existed may have been taken by
        # the node's previous incarnation, whose window is gone.
        self._window = ReplayWindow(MAX_SKEW_S, replay_capacity, floor=clock())
        self._warned: dict[str, float] = {}
        self.port = port

    async def start(self) -> None:
        self._router = RouterSocket(
            self._on_frames,
            on_refused=lambda reason: peer_dropped_total.labels(reason).inc(),
            max_frame_bytes=MAX_ZMTP_FRAME_BYTES,
        )
        self.port = await self._router.bind(self._host, self.port)
        log.info("peer RPC listening on port %d", self.port)

    async def stop(self) -> None:
        self._acks.close()
        for task in list(self._tasks.values()):
            task.cancel()
        if self._router is not None:
            self._router.close()
            self._router = None

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            peer_dropped_total.labels("malformed").inc()
            return
        ident, rest = frames[0], frames[1:]
        now = self._clock()
        try:
            env = open_frames(self._keyring, rest, now, dst=self.name)
        except PeerWireError as exc:
            self._refused(exc, now)
            return
        if not self._window.admit((env.src, env.request_id, env.code), env.ts, now):
            self._refused(PeerWireError("replay", f"request {env.request_id!r} seen before"), now)
            return
        self._accept(ident, env)

    def _refused(self, exc: PeerWireError, now: float) -> None:
        peer_dropped_total.labels(exc.reason).inc()
        # A cluster misconfigured (another version, a node addressed by the wrong name), not noise.
        misconfigured = exc.reason in ("version", "misdirected")
        if misconfigured and now - self._warned.get(exc.reason, -math.inf) >= WARN_EVERY_S:
            self._warned[exc.reason] = now
            log.warning("refused a peer frame (and may refuse more, counted): %s", exc)
            return
        log.debug("dropped a peer frame: %s", exc)

    def _accept(self, ident: bytes, env: Envelope) -> None:
        key = (ident, env.src, env.request_id)
        if env.code == Op.CANCEL:
            task = self._tasks.get(key)
            if task is not None:
                task.cancel()
                self._forget(key)  # a task cancelled before its first step never runs _run
            return
        op = _OPS.get(env.code)  # a dict, not Op(code): the enum's lookup is slow when cold
        if op is None:
            peer_dropped_total.labels("unknown_op").inc()
            return
        if op == Op.PING:  # answered here and now: the pong is the ack
            _count_served(op, "success")
            self._reply(key, Kind.PONG, None)
            return
        # Loads and placements take seconds, so holding back their ack saves nothing, and a
        # requester that does not say how long it waits (an older peer) expects it at once.
        defer = env.ack_s is not None and op in (Op.INFER, Op.STREAM)
        if not defer:
            self._send(key, Kind.ACK, None)
        task = asyncio.create_task(self._run(key, op, env))
        self._tasks[key] = task
        if defer:
            assert env.ack_s is not None
            self._acks.add(key, env.ack_s * ACK_GRACE_FRACTION)

    def _ack(self, key: _TaskKey) -> None:
        """The answer is not ready within the grace: tell the requester the work goes on."""
        self._send(key, Kind.ACK, None)

    def _forget(self, key: _TaskKey) -> None:
        self._tasks.pop(key, None)
        self._acks.discard(key)  # cancelled before anything was sent: no ack owed either

    async def _run(self, key: _TaskKey, op: Op, env: Envelope) -> None:
        try:
            kind, body = await self._serve(key, op, env)
            outcome = "success"
        except asyncio.CancelledError:
            self._forget(key)
            _count_served(op, "cancelled")
            raise
        except Exception as exc:
            if isinstance(exc, PeerWireError):  # a signed request whose body makes no sense
                exc = InvalidRequest("request", str(exc))
            outcome = getattr(exc, "code", "internal_error")
            kind, body = Kind.ERROR, error_to_wire(exc)
        # Forgotten and counted before the answer goes (no done callback after it): once it is
        # sent, the requester's side runs, and work left here would compete with it for a CPU.
        self._tasks.pop(key, None)
        _count_served(op, outcome)
        self._reply(key, kind, body)  # and its ack is no longer owed

    async def _serve(self, key: _TaskKey, op: Op, env: Envelope) -> tuple[Kind, Any]:
        """Do what the request asks; return the final answer (stream pieces are sent here)."""
        if op == Op.INFER:
            result = await self._handler.peer_infer(request_from_wire(env.body))
            return Kind.RESULT, result_to_wire(result)
        if op == Op.STREAM:
            async with contextlib.aclosing(
                self._handler.peer_infer_stream(request_from_wire(env.body))
            ) as items:
                async for item in items:
                    if isinstance(item, TokenChunk):
                        self._reply(key, Kind.TOKEN, item.text)
                    else:
                        return Kind.RESULT, result_to_wire(item)
            raise RuntimeError("the stream ended without a result")
        if op == Op.LOAD:
            info = await self._handler.peer_load(load_from_wire(env.body), env.term)
            return Kind.RESULT, {"name": info.name, "state": info.state}
        if op == Op.PLACE:
            if not isinstance(env.body, str):
                raise PeerWireError("malformed", "place body is not a model name")
            return Kind.RESULT, await self._handler.peer_place(env.body)
        if op == Op.RESTORE:
            body = env.body
            if not (
                isinstance(body, list) and len(body) == 2 and all(isinstance(x, str) for x in body)
            ):
                raise PeerWireError("malformed", "restore body is not [model, node]")
            return Kind.RESULT, await self._handler.peer_restore(body[0], body[1])
        raise PeerWireError("malformed", f"operation {op.name} has no answer")

    def _reply(self, key: _TaskKey, kind: Kind, body: Any) -> None:
        self._acks.discard(key)  # the first reply within the grace stands for the ack
        self._send(key, kind, body)

    def _send(self, key: _TaskKey, kind: Kind, body: Any) -> None:
        """Send a reply, sealed for the requester, on the connection its request came on."""
        ident, requester, rid = key
        env = Envelope(kind, rid, self._clock(), body, src=self.name, dst=requester)
        if self._router is not None and not self._router.send([ident, *seal(self._keyring, env)]):
            log.debug("peer reply lost: the requester's connection is gone")


class _Replies:
    """One request's replies in arrival order, and its caller waiting for the next."""

    __slots__ = ("items", "broken", "_waiter", "_deadlines")

    def __init__(self, deadlines: _Deadlines[_Replies]) -> None:
        self.items: collections.deque[Envelope] = collections.deque()
        self.broken: str | None = None
        """Why no further reply can come (the connection broke), once that is known."""
        self._waiter: asyncio.Future[None] | None = None
        self._deadlines = deadlines

    def next(self) -> Envelope | None:
        """Return the next reply if one is here (no coroutine to wait when it already is)."""
        return self.items.popleft() if self.items else None

    def put(self, env: Envelope) -> None:
        self.items.append(env)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Return once a reply is here; TimeoutError if none comes within `timeout` seconds,
        PeerUnavailable once none can come."""
        if self.items:
            return
        if self.broken is not None:
            raise PeerUnavailable(self.broken)
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        # The client's shared deadlines fail the waiter, not asyncio.timeout (a context
        # manager that cancels and uncancels the task) nor a timer of its own.
        self._deadlines.add(self, timeout)
        try:
            await waiter
        finally:
            self._deadlines.discard(self)
            self._waiter = None

    def expire(self) -> None:
        """Fail the wait in progress with TimeoutError: its time is up."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())

    def fail(self, why: str) -> None:
        """No reply can come any more: the wait in progress, and any later one, ends now."""
        self.broken = why
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(PeerUnavailable(why))


class _Connection:
    """One DEALER socket to one peer; replies are routed to the waiting requests as they come."""

    def __init__(self, client: PeerClient, peer: PeerAddress) -> None:
        self.client = client
        self.peer = peer
        host, port = _split_address(peer.address)
        self.pending: dict[str, _Replies] = {}
        self.dealer = DealerSocket(
            host,
            port,
            self._on_frames,
            on_broken=self._on_broken,
            max_frame_bytes=MAX_ZMTP_FRAME_BYTES,
        )

    def _on_broken(self, why: str) -> None:
        # Replies come back on the connection the request went out on: none can come now.
        for replies in self.pending.values():
            replies.fail(f"peer unreachable: {why}")

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            env = open_frames(
                self.client.keyring,
                frames,
                self.client.clock(),
                dst=self.client.name,
                src=self.peer.node,
            )
        except PeerWireError as exc:
            peer_dropped_total.labels(exc.reason).inc()
            return
        replies = self.pending.get(env.request_id)
        if replies is not None:
            replies.put(env)

    def close(self) -> None:
        self.dealer.close()


_LAST = (Kind.RESULT, Kind.PONG, Kind.ERROR)
"""The reply kinds that end a request."""


def _raise_error(env: Envelope) -> None:
    """Raise the peer's error when `env` carries one."""
    if env.code == Kind.ERROR:
        raise error_from_wire(env.body)


class PeerClient:
    """Send requests to peers, each sealed for its destination; one connection per peer, reused."""

    def __init__(
        self,
        keyring: Keyring,
        *,
        name: str,
        ack_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        """This node's name: requests carry it as their sender, replies must be sealed for it."""
        self.keyring = keyring
        self.ack_timeout = ack_timeout
        self.clock = clock
        self._connections: dict[PeerAddress, _Connection] = {}
        self._waits: _Deadlines[_Replies] = _Deadlines(_Replies.expire)
        # Request ids are the nonces of the peers' replay windows: unique per sender, so a
        # random prefix per client (a restarted node gets a new one) and a counter, which
        # costs a fraction of a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        self._ids = itertools.count(1)

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    async def ping(self, peer: PeerAddress) -> float:
        """Return the round trip to `peer` in seconds."""
        began = time.perf_counter()
        async for _ in self._call(peer, Op.PING, None, None):
            pass
        return time.perf_counter() - began

    async def infer(self, peer: PeerAddress, req: InferRequest, timeout: float) -> InferResult:
        """Run a whole inference on the peer."""
        # A coroutine, not a walk over _call: no async generator to finalise per request.
        connection, rid, replies = await self._send_request(
            peer, Op.INFER, request_to_wire(req), None
        )
        finished = False
        try:
            deadline = time.monotonic() + timeout
            while True:
                env = replies.next() or await self._next_reply(peer, replies, deadline, timeout)
                finished = env.code in _LAST
                if finished:
                    _raise_error(env)
                    return result_from_wire(env.body)
        finally:
            self._settle(peer, connection, rid, finished)

    async def stream(
        self, peer: PeerAddress, req: InferRequest, timeout: float
    ) -> AsyncGenerator[TokenChunk | InferResult, None]:
        """Stream an inference from the peer; closing the iterator cancels it there."""
        async for env in self._call(peer, Op.STREAM, request_to_wire(req), None, timeout):
            if env.code == Kind.TOKEN:
                yield token_from_wire(env.body)
            else:
                yield result_from_wire(env.body)

    async def load(
        self, peer: PeerAddress, req: LoadRequest, term: int | None, timeout: float
    ) -> None:
        """Ask the peer to load a model under the primary's `term` (a fencing token)."""
        async for _ in self._call(peer, Op.LOAD, load_to_wire(req), term, timeout):
            return

    async def place(self, peer: PeerAddress, model: str, timeout: float) -> str:
        """Ask the primary `peer` to place `model`; return the node that holds it."""
        return await self._node_answer(peer, Op.PLACE, model, timeout)

    async def restore(self, peer: PeerAddress, model: str, node: str, timeout: float) -> str:
        """Ask the primary `peer` where `model`, which `node` remembers, belongs now."""
        return await self._node_answer(peer, Op.RESTORE, [model, node], timeout)

    async def _node_answer(self, peer: PeerAddress, op: Op, body: Any, timeout: float) -> str:
        what = op.name.lower()
        async for env in self._call(peer, op, body, None, timeout):
            if not isinstance(env.body, str):
                raise PeerUnavailable(f"primary {peer} answered {what} without a node")
            return env.body
        raise PeerUnavailable(f"primary {peer} ended {what} without an answer")

    async def _call(
        self, peer: PeerAddress, op: Op, body: Any, term: int | None, timeout: float = 10.0
    ) -> AsyncIterator[Envelope]:
        """Send one request; yield TOKEN envelopes and the final RESULT/PONG; raise on ERROR."""
        connection, rid, replies = await self._send_request(peer, op, body, term)
        finished = False
        try:
            deadline = time.monotonic() + timeout
            while True:
                env = replies.next() or await self._next_reply(peer, replies, deadline, timeout)
                finished = env.code in _LAST
                _raise_error(env)
                if finished or env.code == Kind.TOKEN:
                    yield env
                if finished:
                    return
        finally:
            self._settle(peer, connection, rid, finished)

    async def _send_request(
        self, peer: PeerAddress, op: Op, body: Any, term: int | None
    ) -> tuple[_Connection, str, _Replies]:
        """Send one request and wait for its ack (or its first reply, which stands in for the
        ack); PeerUnavailable if neither comes within the ack timeout."""
        connection = self._connections.get(peer)
        if connection is None:
            connection = self._connections[peer] = _Connection(self, peer)
        rid = f"{self._id_prefix}{next(self._ids):x}"
        replies = _Replies(self._waits)
        connection.pending[rid] = replies
        try:
            env = Envelope(
                op, rid, self.clock(), body, term, self.ack_timeout, src=self.name, dst=peer.node
            )
            frames = seal(self.keyring, env)
            try:
                connection.dealer.send(frames)
            except QueueFull as exc:  # the peer has not been reading
                raise PeerUnavailable(f"peer {peer} is not taking requests: {exc}") from None
            try:
                await replies.wait(self.ack_timeout)
            except TimeoutError:
                # No ack: the peer is down or cut off. Drop the socket so a later call reconnects.
                # Requests in flight at once to a dead peer all time out here: close it once.
                connection.close()
                if self._connections.get(peer) is connection:
                    del self._connections[peer]
                raise PeerUnavailable(
                    f"peer {peer} did not answer within {self.ack_timeout} s"
                ) from None
        except BaseException:
            self._settle(peer, connection, rid, False)
            raise
        if replies.items[0].code == Kind.ACK:
            replies.items.popleft()  # otherwise the answer came first: it stands for the ack
        return connection, rid, replies

    async def _next_reply(
        self, peer: PeerAddress, replies: _Replies, deadline: float, timeout: float
    ) -> Envelope:
        """Return the request's next reply; PeerUnavailable once the deadline has passed."""
        if not replies.items:
            try:
                await replies.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise PeerUnavailable(f"peer {peer} went silent for {timeout:.0f} s") from None
        return replies.items.popleft()

    def _settle(self, peer: PeerAddress, connection: _Connection, rid: str, finished: bool) -> None:
        """Forget the request; if it did not finish, tell the peer to stop working for nobody."""
        replies = connection.pending.pop(rid, None)
        broken = replies is not None and replies.broken is not None  # the peer has forgotten it
        if not finished and not broken and peer in self._connections:
            with contextlib.suppress(QueueFull):
                cancel = Envelope(Op.CANCEL, rid, self.clock(), None, src=self.name, dst=peer.node)
                connection.dealer.send(seal(self.keyring, cancel))
