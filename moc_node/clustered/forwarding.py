"""Serve a client's request for a model this node does not hold: forward it, or place it first.

A request is forwarded at most once: requests that arrive from a peer are always served where
they land. A holder that does not acknowledge in time is replaced by the next one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar

import prometheus_client

from actors.types import EmbedRequest, EmbedResult, InferRequest, InferResult
from cluster.routing import RouteKind, holders
from moc_node.clustered.link import ClusterLink
from moc_node.node import StreamItem
from transports.peer import PeerAddress
from transports.peer_wire import PeerUnavailable

log = logging.getLogger(__name__)

forward_retries_total = prometheus_client.Counter(
    "moc_cluster_forward_retries",
    "Forwarded requests sent to another holder after one did not acknowledge in time",
    ["mode"],
)


class ServesHere(Protocol):
    """This node's own serving (a LocalNode): where a model placed here is served."""

    async def infer(self, req: InferRequest) -> InferResult: ...

    def infer_stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]: ...

    async def embed(self, req: EmbedRequest) -> EmbedResult: ...


_Req = TypeVar("_Req", InferRequest, EmbedRequest)
_Answer = TypeVar("_Answer")


class Forwarder:
    """Route requests to the peers that hold the model, or to where the primary places it."""

    def __init__(
        self, link: ClusterLink, here: ServesHere, place: Callable[[str], Awaitable[str]]
    ) -> None:
        self._link = link
        self._here = here
        self._place = place  # ask the primary where the model goes; returns the holder

    async def infer(self, req: InferRequest) -> InferResult:
        """Run a whole inference for a model this node does not hold."""
        return await self._answer(req, "infer", self._here.infer, self._link.client.infer)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """Embed with a model this node does not hold."""
        return await self._answer(req, "embed", self._here.embed, self._link.client.embed)

    async def _answer(
        self,
        req: _Req,
        mode: str,
        here: Callable[[_Req], Awaitable[_Answer]],
        there: Callable[[PeerAddress, _Req, float], Awaitable[_Answer]],
    ) -> _Answer:
        """Serve a request answered once: here if the model was placed here, else on the first
        holder that acknowledges (`mode` labels the retries)."""
        # A coroutine, not stream()'s generator: the non-streaming hot path of forwarding.
        nodes = await self._destination(req.model)
        if nodes == (self._link.name,):
            return await here(req)
        candidates = self._candidates(nodes)
        for attempt, holder in enumerate(candidates, 1):
            try:
                return await there(self._link.peer_address(holder), req, self._link.timeout)
            except PeerUnavailable as exc:
                if attempt == len(candidates):
                    raise
                forward_retries_total.labels(mode).inc()
                log.info("forwarding %s: %s; trying the next holder", req.model, exc)
        raise AssertionError("unreachable: candidates is never empty")

    async def stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]:
        """Stream from the first holder that acknowledges; one that fails before its first
        item is replaced by the next, one that fails later ends the request with its error."""
        nodes = await self._destination(req.model)
        if nodes == (self._link.name,):
            async with contextlib.aclosing(self._here.infer_stream(req)) as items:
                async for item in items:
                    yield item
            return
        candidates = self._candidates(nodes)
        for attempt, holder in enumerate(candidates, 1):
            started = False
            try:
                peer = self._link.peer_address(holder)
                pieces = self._link.client.stream(peer, req, timeout=self._link.timeout)
                async with contextlib.aclosing(pieces) as items:
                    async for item in items:
                        started = True
                        yield item
                return
            except PeerUnavailable as exc:
                if started or attempt == len(candidates):
                    raise
                forward_retries_total.labels("stream").inc()
                log.info("forwarding %s: %s; trying the next holder", req.model, exc)

    async def _destination(self, model: str) -> tuple[str, ...]:
        """Return the holders to try in order (this node alone if it was placed here)."""
        # The hot path of forwarding: the node has just checked its own board, so only the
        # peers' gossip is read here (building this node's live metadata costs more).
        peers = holders(self._link.runner.members(), model, exclude=self._link.name)
        if peers:
            return tuple(peers)
        decision = self._link.route(model)
        if decision.kind == RouteKind.WAIT:
            decision = await self._link.await_load(model, decision)
        if decision.kind == RouteKind.LOAD:
            return (await self._place(model),)
        return decision.nodes

    def _candidates(self, nodes: tuple[str, ...]) -> list[str]:
        return [n for n in nodes if n != self._link.name] or list(nodes)


__all__ = ["Forwarder", "ServesHere", "forward_retries_total"]
