"""This node's membership: the gossip runner, the peer RPC client and what they tell it.

The other modules of `moc_node.clustered` read the cluster through a `ClusterLink` (members,
routes, the primary, a peer's address) and send peer requests through its `client`. It knows
nothing of the models here: this node's own gossip comes from the `meta` callable it is given.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import prometheus_client

from cluster.config import ClusterConfig
from cluster.election import TermStore
from cluster.keyring import Keyring
from cluster.messages import MemberState
from cluster.meta import NodeMeta
from cluster.routing import ClusterMember, Route, RouteKind, route
from cluster.runner import ClusterRunner
from transports.peer import PeerAddress, PeerClient
from transports.peer_wire import PeerUnavailable

log = logging.getLogger(__name__)


def advertised_host(config: ClusterConfig) -> str:
    """Return the host peers dial for this node's HTTP, ZMQ and peer ports."""
    advertised = (config.advertise or config.bind).rsplit(":", 1)[0]
    # A wildcard bind needs `advertise`; without it only loopback peers can reach us.
    return "127.0.0.1" if advertised in ("", "0.0.0.0") else advertised


class ClusterLink:
    """The node's membership in the cluster (gossip, election) and its peer RPC client."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        name: str,
        keyring: Keyring,
        term_store: TermStore,
        meta: Callable[[], NodeMeta],
        request_timeout: float = 120.0,
    ) -> None:
        self.config = config
        self.name = name
        self.timeout = request_timeout
        """Seconds a peer request (forward, load, place) may take."""
        self._meta = meta
        self.runner = ClusterRunner(
            config, name, keyring, term_store, meta, registry=prometheus_client.REGISTRY
        )
        # The client's frames carry this node's name: a captured frame cannot be replayed by
        # another node.
        self.client = PeerClient(keyring, name=name, ack_timeout=config.peer_ack_timeout_s)

    async def start(self) -> None:
        """Bind the gossip sockets and join the seeds."""
        await self.runner.start()

    async def leave(self, timeout: float = 2.0) -> None:
        """Tell the peers this node is leaving (they stop routing to it), before draining."""
        await self.runner.leave(timeout)

    async def stop(self) -> None:
        await self.runner.stop()
        self.client.close()

    # -- reading the view ---------------------------------------------------------------------

    def members(self) -> list[ClusterMember]:
        """Return the members; this node's own entry with its live state, not its last gossip."""
        return [
            dataclasses.replace(m, meta=self._meta()) if m.name == self.name else m
            for m in self.runner.members()
        ]

    def route(self, model: str) -> Route:
        return route(self.members(), model, self.name)

    def holds_elsewhere(self, model: str) -> bool:
        """Return whether a peer (alive, not leaving) holds `model`."""
        return self.route(model).kind == RouteKind.FORWARD

    def peer_address(self, name: str) -> PeerAddress:
        """Return where to send peer requests for member `name`; PeerUnavailable if unknown."""
        member = self.runner.member(name)
        if member is None or member.meta is None or not member.meta.peer:
            raise PeerUnavailable(f"node {name} is not known or has no peer address")
        return PeerAddress(name, member.meta.peer)

    def has_majority(self) -> bool:
        """Return whether this node sees a majority of the voters alive (itself included)."""
        voters = set(self.config.voters)
        if not voters:
            return False
        alive = {m.name for m in self.members() if m.state == MemberState.ALIVE} | {self.name}
        return len(voters & alive) > len(voters) // 2

    # -- waiting for the view to change (each polls the gossiped state with a deadline) ---------

    async def await_joined(self) -> None:
        """Wait until a peer is known alive, or give up after one stream exchange's time.

        The join is a push-pull with the seeds, whose reply carries the seed's whole view at
        once: the first peer seen means the view is complete. A node whose seeds do not answer
        (the first of a cluster to start, or the last survivor) goes on alone after the wait.
        """
        if not self.config.seeds:
            return
        patience = self.config.stream_timeout_s
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            if any(m.name != self.name and m.meta is not None for m in self.runner.members()):
                return
            await asyncio.sleep(0.02)
        log.info("no cluster peer answered within %.1f s: restoring without its view", patience)

    async def await_load(self, model: str, decision: Route) -> Route:
        """Wait (with the request timeout) for a peer's load in progress, then route again."""
        deadline = time.monotonic() + self.timeout
        while decision.kind == RouteKind.WAIT and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            decision = self.route(model)
        return decision

    async def await_primary(self) -> tuple[str, int] | None:
        """Wait (about one lease and two election rounds) for a primary to be known."""
        patience = self.config.lease_s + 2 * self.config.election_retry_s
        deadline = time.monotonic() + patience
        primary = self.runner.primary()
        while primary is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            primary = self.runner.primary()
        return primary


__all__ = ["ClusterLink", "advertised_host"]
