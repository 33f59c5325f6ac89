"""The peer RPC client: DEALER connections to other nodes, one per peer, reused.

A caller must hear from the peer within `ack_timeout` (an ACK, or the answer itself), so it can
tell "the peer is down" (silence: try another holder) from "the peer is working on it". A request
whose connection breaks fails at once (PeerUnavailable): its answer could not come back. Closing
a request early (an abandoned stream) sends CANCEL, so the peer stops working for nobody.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from actors.types import (
    EmbedRequest,
    EmbedResult,
    InferRequest,
    InferResult,
    LoadRequest,
    TokenChunk,
)
from cluster.keyring import Keyring
from transports.metrics import PEER_DROPPED
from transports.peer.deadlines import Deadlines
from transports.peer_wire import (
    MAX_ZMTP_FRAME_BYTES,
    Envelope,
    Kind,
    Op,
    PeerUnavailable,
    PeerWireError,
    embed_result_from_wire,
    embed_to_wire,
    error_from_wire,
    load_to_wire,
    open_frames,
    request_to_wire,
    result_from_wire,
    seal,
    token_from_wire,
)
from transports.zmtp_sockets import DealerSocket, QueueFull

__all__ = ["PeerAddress", "PeerClient"]


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


class _Replies:
    """One request's replies in arrival order, and its caller waiting for the next."""

    __slots__ = ("items", "broken", "_waiter", "_deadlines")

    def __init__(self, deadlines: Deadlines[_Replies]) -> None:
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
            PEER_DROPPED.labels(exc.reason).inc()
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
        self._waits: Deadlines[_Replies] = Deadlines(_Replies.expire)
        # Request ids are the nonces of the peers' replay windows: unique per sender, so a
        # random prefix per client (a restarted node gets a new one) and a counter, which
        # costs a fraction of a uuid4 per request.
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        self._ids = itertools.count(1)

    def close(self) -> None:
        """Close every connection; a later request opens a new one."""
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    async def ping(self, peer: PeerAddress) -> float:
        """Return the round trip to `peer` in seconds."""
        began = time.perf_counter()
        await self._answer(peer, Op.PING, None, 10.0)
        return time.perf_counter() - began

    async def infer(self, peer: PeerAddress, req: InferRequest, timeout: float) -> InferResult:
        """Run a whole inference on the peer."""
        return result_from_wire(await self._answer(peer, Op.INFER, request_to_wire(req), timeout))

    async def embed(self, peer: PeerAddress, req: EmbedRequest, timeout: float) -> EmbedResult:
        """Embed the request's inputs on the peer."""
        body = await self._answer(peer, Op.EMBED, embed_to_wire(req), timeout)
        return embed_result_from_wire(body)

    async def _answer(
        self, peer: PeerAddress, op: Op, body: Any, timeout: float, term: int | None = None
    ) -> Any:
        """Send a request answered once (no stream); return the answer's body, raise its error."""
        # A coroutine, not a walk over _call: no async generator to finalise per request.
        connection, rid, replies = await self._send_request(peer, op, body, term)
        finished = False
        try:
            deadline = time.monotonic() + timeout
            while True:
                env = replies.next() or await self._next_reply(peer, replies, deadline, timeout)
                finished = env.code in _LAST
                if finished:
                    _raise_error(env)
                    return env.body
        finally:
            self._settle(peer, connection, rid, finished)

    async def stream(
        self, peer: PeerAddress, req: InferRequest, timeout: float
    ) -> AsyncGenerator[TokenChunk | InferResult, None]:
        """Stream an inference from the peer; closing the iterator cancels it there."""
        connection, rid, replies = await self._send_request(
            peer, Op.STREAM, request_to_wire(req), None
        )
        finished = False
        try:
            deadline = time.monotonic() + timeout
            while True:
                env = replies.next() or await self._next_reply(peer, replies, deadline, timeout)
                finished = env.code in _LAST
                _raise_error(env)
                if env.code == Kind.TOKEN:
                    yield token_from_wire(env.body)
                elif finished:
                    yield result_from_wire(env.body)
                    return
        finally:
            self._settle(peer, connection, rid, finished)

    async def load(
        self, peer: PeerAddress, req: LoadRequest, term: int | None, timeout: float
    ) -> None:
        """Ask the peer to load a model under the primary's `term` (a fencing token)."""
        await self._answer(peer, Op.LOAD, load_to_wire(req), timeout, term)

    async def place(self, peer: PeerAddress, model: str, timeout: float) -> str:
        """Ask the primary `peer` to place `model`; return the node that holds it."""
        return await self._node_answer(peer, Op.PLACE, model, timeout)

    async def restore(self, peer: PeerAddress, model: str, node: str, timeout: float) -> str:
        """Ask the primary `peer` where `model`, which `node` remembers, belongs now."""
        return await self._node_answer(peer, Op.RESTORE, [model, node], timeout)

    async def _node_answer(self, peer: PeerAddress, op: Op, body: Any, timeout: float) -> str:
        node = await self._answer(peer, op, body, timeout)
        if not isinstance(node, str):
            raise PeerUnavailable(f"primary {peer} answered {op.name.lower()} without a node")
        return node

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
