"""The clustered node: this host's LocalNode, plus routing through the cluster (a `Node`).

A client's request for a model this node holds is served here; any other goes where the
cluster has (or places) it. Draining, the node hands requests to peers that hold the model.
Everything else (jobs, goals, status, health) is this host's and is answered by the LocalNode.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

from actors.types import (
    DeviceInfo,
    EmbedRequest,
    EmbedResult,
    HealthReport,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
)
from cluster.config import ClusterConfig
from cluster.election import TermStore
from cluster.keyring import Keyring
from cluster.meta import DeviceMeta, ModelMeta, NodeMeta
from moc_node.clustered.forwarding import Forwarder
from moc_node.clustered.link import ClusterLink, advertised_host
from moc_node.clustered.peer_handler import PeerHandler
from moc_node.clustered.placement import Placement
from moc_node.clustered.restore import clear_restore
from moc_node.clustered.view import cluster_document
from moc_node.node import LocalNode, StreamItem
from transports.peer import PeerServer

log = logging.getLogger(__name__)


class ClusteredNode:
    """A LocalNode that routes requests for models it does not hold through the cluster."""

    def __init__(
        self,
        local: LocalNode,
        config: ClusterConfig,
        *,
        name: str,
        keyring: Keyring,
        term_store: TermStore,
        generation: int,
        request_timeout: float = 120.0,
    ) -> None:
        self._local = local
        self._generation = generation
        self._host = advertised_host(config)
        self._http_port = 0
        self._zmq_port = 0
        self._stopped = False
        self.link = ClusterLink(
            config,
            name=name,
            keyring=keyring,
            term_store=term_store,
            meta=self._meta,
            request_timeout=request_timeout,
        )
        self.placement = Placement(self.link, local)
        self._forwarder = Forwarder(self.link, local, self.placement.place_via_primary)
        # Peer frames are sealed for one node and refused by any other (a captured frame cannot
        # be sent to another node), so the server carries the member name too.
        self.server = PeerServer(
            PeerHandler(local, self.placement),
            keyring,
            name=name,
            host=config.bind.rsplit(":", 1)[0],
            port=config.peer_port,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def advertise(self, http_port: int, zmq_port: int) -> None:
        """Gossip these client ports to the peers (bound before `server` and `link` start)."""
        self._http_port = http_port
        self._zmq_port = zmq_port

    async def start(self) -> None:
        """Restore what the cluster leaves here (a peer may hold a model now), then preload.

        A remembered model that a live peer now holds is not loaded again but forgotten: the
        cluster placed it there meanwhile. Call once `server` and `link` are started.
        """
        records = self._local.remembered()
        if records:
            plan = await clear_restore(self.link, self.placement.reserve_for_restore, records)
            for model, holder in plan.skip.items():
                log.info("not restoring model %s: %s holds it now", model, holder)
                self._local.forget(model)
            records = [r for r in records if r.name not in plan.skip]
        await self._local.start(records)

    async def leave(self) -> None:
        """Tell the peers this node is leaving (they stop routing to it), before draining."""
        await self.link.leave()

    async def stop_cluster(self) -> None:
        """Drop reservations, stop gossip, the peer client and the peer server (once)."""
        if self._stopped:
            return
        self._stopped = True
        self.placement.stop()
        await self.link.stop()
        await self.server.stop()

    async def actors_alive(self, timeout: float = 2.0) -> bool:
        return await self._local.actors_alive(timeout)

    async def drain(self, timeout: float) -> None:
        await self._local.drain(timeout)

    async def close(self, timeout: float = 30.0) -> None:
        """Leave the cluster's RPC and gossip, then close this host's node."""
        await self.stop_cluster()
        await self._local.close(timeout)

    @property
    def name(self) -> str:
        return self._local.name

    @property
    def draining(self) -> bool:
        return self._local.draining

    @property
    def closed(self) -> bool:
        return self._local.closed

    def is_ready(self) -> bool:
        return self._local.is_ready()

    # -- routed -------------------------------------------------------------------------------

    async def infer(self, req: InferRequest) -> InferResult:
        if self._goes_remote(req.model):
            return await self._forwarder.infer(req)  # a coroutine: no generator layers
        return await self._local.infer(req)

    def infer_stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]:
        if self._goes_remote(req.model):
            return self._forwarder.stream(req)
        return self._local.infer_stream(req)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        if self._goes_remote(req.model):
            return await self._forwarder.embed(req)
        return await self._local.embed(req)

    async def place(self, model: str) -> str:
        """Have `model` loaded wherever the primary places it; return the holder's name."""
        return await self.placement.place(model)

    def cluster_view(self) -> dict[str, Any]:
        runner = self.link.runner
        return cluster_document(
            self.link.members(),
            me=self.link.name,
            primary=runner.primary(),
            term=runner.term,
            dropped=runner.dropped(),
        )

    def _goes_remote(self, model: str) -> bool:
        """Return whether a client's request for `model` is served through the cluster."""
        # Draining, a node hands requests to peers that hold the model; otherwise a model it
        # does not hold is served wherever the cluster has (or places) it.
        if self._local.draining:
            return self.link.holds_elsewhere(model)
        return not self._local.holds(model)

    def _meta(self) -> NodeMeta:
        """This node's state as gossiped metadata (devices, models, queues, addresses)."""
        host = self._host
        models = self._local.models()
        return NodeMeta(
            devices=tuple(
                DeviceMeta(d.label, int(d.total_mb), int(d.free_mb), int(d.claimed_mb))
                for d in self._local.devices()
            ),
            loaded=tuple(
                ModelMeta(m.name, m.in_flight + m.queued) for m in models if m.state == "loaded"
            ),
            loading=tuple(m.name for m in models if m.state == "loading"),
            zmq=f"{host}:{self._zmq_port}",
            http=f"{host}:{self._http_port}",
            peer=f"{host}:{self.server.port}",
            generation=self._generation,
            leaving=self._local.draining,
        )

    # -- this host's (answered by the LocalNode) ------------------------------------------------

    async def load(self, req: LoadRequest) -> ModelInfo:
        return await self._local.load(req)

    async def unload(self, name: str) -> ModelInfo:
        return await self._local.unload(name)

    def models(self) -> list[ModelInfo]:
        return self._local.models()

    def devices(self) -> list[DeviceInfo]:
        return self._local.devices()

    def health(self) -> HealthReport:
        return self._local.health()

    def status(self) -> dict[str, Any]:
        return self._local.status()

    async def list_jobs(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return await self._local.list_jobs(limit, offset)

    async def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return await self._local.create_job(spec)

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await self._local.get_job(job_id)

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._local.cancel_job(job_id)

    async def list_goals(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return await self._local.list_goals(limit, offset)

    async def create_goal(self, spec: dict[str, Any]) -> dict[str, Any]:
        return await self._local.create_goal(spec)

    async def get_goal(self, goal_id: str) -> dict[str, Any]:
        return await self._local.get_goal(goal_id)

    async def cancel_goal(self, goal_id: str) -> dict[str, Any]:
        return await self._local.cancel_goal(goal_id)


__all__ = ["ClusteredNode"]
