"""The peer RPC server: a ROUTER that serves other nodes' requests here, one hop at most.

Each request runs as a task; an inference's ACK is held back for a fraction of the requester's
ack timeout, so that a quick answer goes alone. Frames that fail authentication, are stale,
malformed, sealed for another node or replayed are counted and dropped, never answered. A
signed request whose body does not decode is refused (an invalid_request error) and counted
with outcome "malformed".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol

from actors.errors import InvalidRequest
from actors.types import (
    EmbedRequest,
    EmbedResult,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from cluster.keyring import Keyring
from transports.metrics import PEER_DROPPED, PEER_REQUESTS
from transports.peer.deadlines import Deadlines
from transports.peer_wire import (
    MAX_SKEW_S,
    MAX_ZMTP_FRAME_BYTES,
    Envelope,
    Kind,
    Op,
    PeerWireError,
    embed_from_wire,
    embed_result_to_wire,
    error_to_wire,
    load_from_wire,
    open_frames,
    request_from_wire,
    result_to_wire,
    seal,
)
from transports.replay_window import DEFAULT_CAPACITY, ReplayWindow
from transports.zmtp_sockets import RouterSocket

__all__ = ["ACK_GRACE_FRACTION", "WARN_EVERY_S", "PeerHandler", "PeerServer"]

log = logging.getLogger(__name__)

_served: dict[tuple[Op, str], Any] = {}
"""Counter children by (operation, outcome): `labels()` costs more than the increment."""


def _count_served(op: Op, outcome: str) -> None:
    child = _served.get((op, outcome))
    if child is None:
        child = _served[op, outcome] = PEER_REQUESTS.labels(op.name.lower(), outcome)
    child.inc()


_OPS = {int(op): op for op in Op}
_ANSWERED_SOON = frozenset({Op.INFER, Op.STREAM, Op.EMBED})
"""Requests whose answer often comes within the ack grace: their ACK is held back for it."""

WARN_EVERY_S = 60.0
"""Refusals that point at a misconfigured cluster (another protocol version, frames sealed for
another node) are logged as warnings at most this often; every one is counted."""

ACK_GRACE_FRACTION = 0.2
"""Of the requester's ack timeout: how long the peer holds back the ACK, hoping to send the
answer instead. The rest of the timeout is margin for a busy event loop and the network."""


class PeerHandler(Protocol):
    """What a node does for its peers: serve locally (never forward again: one hop at most)."""

    async def peer_infer(self, req: InferRequest) -> InferResult: ...

    def peer_infer_stream(
        self, req: InferRequest
    ) -> AsyncGenerator[TokenChunk | InferResult, None]: ...

    async def peer_embed(self, req: EmbedRequest) -> EmbedResult: ...

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo: ...

    async def peer_place(self, model: str) -> str:
        """As the primary: make sure `model` is loaded somewhere; return the holder's name."""
        ...

    async def peer_restore(self, model: str, node: str) -> str:
        """As the primary: say which node `model`, remembered by restarting `node`, belongs to."""
        ...


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
        self._acks: Deadlines[_TaskKey] = Deadlines(self._ack)
        # Floored at creation: a frame sealed before this server existed may have been taken by
        # the node's previous incarnation, whose window is gone.
        self._window = ReplayWindow(MAX_SKEW_S, replay_capacity, floor=clock())
        self._warned: dict[str, float] = {}
        self.port = port

    async def start(self) -> None:
        """Bind the port (0: any free one, then in `port`) and start serving."""
        self._router = RouterSocket(
            self._on_frames,
            on_refused=lambda reason: PEER_DROPPED.labels(reason).inc(),
            max_frame_bytes=MAX_ZMTP_FRAME_BYTES,
        )
        self.port = await self._router.bind(self._host, self.port)
        log.info("peer RPC listening on port %d", self.port)

    async def stop(self) -> None:
        """Cancel the requests being served and close the socket."""
        self._acks.close()
        for task in list(self._tasks.values()):
            task.cancel()
        if self._router is not None:
            self._router.close()
            self._router = None

    def serving(self) -> int:
        """Return how many peer requests are being served here now."""
        return len(self._tasks)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            PEER_DROPPED.labels("malformed").inc()
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
        PEER_DROPPED.labels(exc.reason).inc()
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
            PEER_DROPPED.labels("unknown_op").inc()
            return
        if op == Op.PING:  # answered here and now: the pong is the ack
            _count_served(op, "success")
            self._reply(key, Kind.PONG, None)
            return
        # Loads and placements take seconds, so holding back their ack saves nothing, and a
        # requester that does not say how long it waits (an older peer) expects it at once.
        defer = env.ack_s is not None and op in _ANSWERED_SOON
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
        except PeerWireError as exc:  # a signed request whose body makes no sense: refused
            outcome = exc.reason  # counted as "malformed", not as a client's invalid request
            kind, body = Kind.ERROR, error_to_wire(InvalidRequest("request", str(exc)))
        except Exception as exc:
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
        if op == Op.EMBED:
            embedded = await self._handler.peer_embed(embed_from_wire(env.body))
            return Kind.RESULT, embed_result_to_wire(embedded)
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

