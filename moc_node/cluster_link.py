"""Join a Node to the cluster: gossip its state, route requests to peers, serve peers' requests.

Decisions come from `cluster.routing` (pure); this module only gathers the inputs, acts on the
answer and moves requests over the peer RPC. A request is forwarded at most once: requests that
arrive from a peer are always served locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import prometheus_client

from actors.errors import InsufficientMemory, MocError, ModelAlreadyLoaded, ModelNotFound
from actors.serving.store import LoadedRecord
from actors.types import InferRequest, InferResult, LoadRequest, ModelInfo, TokenChunk
from cluster.config import ClusterConfig
from cluster.election import TermStore
from cluster.keyring import Keyring
from cluster.messages import MemberState
from cluster.meta import DeviceMeta, ModelMeta, NodeMeta
from cluster.routing import (
    ClusterMember,
    Route,
    RouteKind,
    choose_load_target,
    holders,
    route,
    takes_work,
)
from cluster.runner import ClusterRunner
from transports.peer import PeerAddress, PeerClient, PeerServer
from transports.peer_wire import PeerUnavailable

if TYPE_CHECKING:
    from moc_node.node import Node

log = logging.getLogger(__name__)

StreamItem = TokenChunk | InferResult

forward_retries_total = prometheus_client.Counter(
    "moc_cluster_forward_retries",
    "Forwarded requests sent to another holder after one did not acknowledge in time",
    ["mode"],
)


# How long a model stays reserved for a restarting node. It starts its loads right after the
# answers and gossips "loading" within a second; a reservation past this was a failed restore.
RESERVE_S = 10.0


class StaleTerm(MocError):
    """A placement command carried an older term than this node has seen: a deposed primary."""

    code = "stale_term"


class NoPrimary(MocError):
    """No primary is known (this side of a partition has no majority): nothing can be placed."""

    code = "no_primary"


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """Which remembered models a (re)starting node loads again, and which it leaves to peers."""

    restore: tuple[str, ...]
    """Load these again, in the remembered order."""
    skip: Mapping[str, str]
    """Model -> the live peer that already holds (or is loading) it: forget these here."""


def plan_restore(
    records: Sequence[LoadedRecord], members: Iterable[ClusterMember], local: str
) -> RestorePlan:
    """Decide which remembered models to restore now that the cluster's view is known.

    A model a live peer (alive, not leaving) holds or is loading was placed there while this
    node was away: loading it again would hold it twice, so it is skipped. A pinned model is
    restored anyway: the operator asked for it on this host, and a peer's copy does not
    replace that (the second copy is deliberate).
    """
    held: dict[str, str] = {}
    for m in sorted(members, key=lambda m: m.name):
        if m.name == local or not takes_work(m):
            continue
        assert m.meta is not None
        for model in (*m.meta.model_names, *m.meta.loading):
            held.setdefault(model, m.name)
    restore: list[str] = []
    skip: dict[str, str] = {}
    for record in records:
        holder = held.get(record.name)
        if holder is None or record.pinned:
            restore.append(record.name)
        else:
            skip[record.name] = holder
    return RestorePlan(tuple(restore), skip)


def placement_failure(model: str, need_mb: float, failures: Mapping[str, Exception]) -> MocError:
    """Return the error for a placement that ran out of nodes to try, from why each one failed.

    Nodes that lack the model's file answer "not found", so only when every node tried said
    that is the model unknown (404); a node that could not be reached might have had it (503,
    retry); otherwise the model exists but fits nowhere (507).
    """
    asked = ", ".join(sorted(failures)) or "none"
    if failures and all(isinstance(e, ModelNotFound) for e in failures.values()):
        return ModelNotFound(f"model {model!r} is not known to any node (asked: {asked})")
    if not any(isinstance(e, InsufficientMemory) for e in failures.values()):
        unreachable = sorted(n for n, e in failures.items() if isinstance(e, PeerUnavailable))
        if unreachable:
            return PeerUnavailable(
                f"model {model!r} could not be placed: {', '.join(unreachable)} did not answer"
            )
    return InsufficientMemory(
        f"model {model!r} needs about {need_mb:.0f} MiB and no node has a device "
        f"with that much free (tried: {asked})"
    )


class ClusterLink:
    """The node's membership in the cluster and its peer RPC, client and server."""

    def __init__(
        self,
        node: Node,
        config: ClusterConfig,
        *,
        name: str,
        keyring: Keyring,
        term_store: TermStore,
        generation: int,
        http_port: int,
        zmq_port: int,
        request_timeout: float = 120.0,
    ) -> None:
        self.node = node
        self.config = config
        self.name = name
        self._generation = generation
        self._http_port = http_port
        self._zmq_port = zmq_port
        self._timeout = request_timeout
        self.runner = ClusterRunner(
            config, name, keyring, term_store, self._meta, registry=prometheus_client.REGISTRY
        )
        host = config.bind.rsplit(":", 1)[0]
        # Both ends carry the node's name: peer frames are sealed for one node and refused by any
        # other (a captured frame cannot be sent to another node).
        self.server = PeerServer(self, keyring, name=name, host=host, port=config.peer_port)
        self.client = PeerClient(
            keyring, name=name, ack_timeout=max(0.5, 4 * config.probe_timeout_s)
        )
        self._placing: dict[str, asyncio.Future[str]] = {}
        self._reservations: set[asyncio.Task[None]] = set()
        advertised = (config.advertise or config.bind).rsplit(":", 1)[0]
        # Peers dial this host for the HTTP, ZMQ and peer ports; a wildcard bind needs advertise.
        self._host = "127.0.0.1" if advertised in ("", "0.0.0.0") else advertised

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.server.start()
        await self.runner.start()

    async def plan_restore(self, records: Sequence[LoadedRecord]) -> RestorePlan:
        """Wait until joined (the view is known), then decide which of `records` to restore.

        The view misses a placement the primary began just before we joined (its target has
        not gossiped "loading" yet), so each unpinned model the view leaves to us is cleared
        with the primary, which serialises placements, when one is known.
        """
        if not any(not r.pinned for r in records):  # only then does the cluster matter
            return plan_restore(records, self.runner.members(), self.name)
        await self._await_joined()
        plan = plan_restore(records, self.runner.members(), self.name)
        pinned = {r.name for r in records if r.pinned}
        skip = dict(plan.skip)
        # All at once: a primary that stopped answering costs one ack timeout, not one per model.
        asked = [m for m in plan.restore if m not in pinned]
        answers = await asyncio.gather(*(self._ask_restore(m) for m in asked))
        for model, holder in zip(asked, answers, strict=True):
            if holder is not None and holder != self.name:
                skip[model] = holder
        return RestorePlan(tuple(m for m in plan.restore if m not in skip), skip)

    async def _ask_restore(self, model: str) -> str | None:
        """Ask the primary where `model` belongs; None if there is none or it cannot say."""
        primary = self.runner.primary()
        if primary is None:
            return None
        try:
            if primary[0] == self.name:
                return await self.peer_restore(model, self.name)
            peer = self._peer_address(primary[0])
            return await self.client.restore(peer, model, self.name, self._timeout)
        except MocError as exc:  # no answer: the view's plan stands
            log.info("could not clear restoring %s with the primary: %s", model, exc)
            return None

    async def _await_joined(self) -> None:
        """Wait until a peer is known alive, or give up after one stream exchange's time.

        The join is a push-pull with the seeds, whose reply carries the seed's whole view at
        once: the first peer seen means the view is complete. A node whose seeds do not answer
        (the first of a cluster to start, or the last survivor) goes on alone after the wait.
        """
        if not self.config.seeds:
            return
        patience = max(10 * self.config.probe_timeout_s, 1.0)  # the runner's stream timeout
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            if any(m.name != self.name and m.meta is not None for m in self.runner.members()):
                return
            await asyncio.sleep(0.02)  # polling the gossiped view with a deadline
        log.info("no cluster peer answered within %.1f s: restoring without its view", patience)

    async def leave(self, timeout: float = 2.0) -> None:
        """Tell the peers this node is leaving (they stop routing to it), before draining."""
        await self.runner.leave(timeout)

    async def stop(self) -> None:
        for task in list(self._reservations):
            task.cancel()
        await self.runner.stop()
        self.client.close()
        await self.server.stop()

    def _meta(self) -> NodeMeta:
        """This node's state as gossiped metadata (devices, models, queues, addresses)."""
        host = self._host
        models = self.node.models()
        return NodeMeta(
            devices=tuple(
                DeviceMeta(d.label, int(d.total_mb), int(d.free_mb), int(d.claimed_mb))
                for d in self.node.devices()
            ),
            loaded=tuple(
                ModelMeta(m.name, m.in_flight + m.queued) for m in models if m.state == "loaded"
            ),
            loading=tuple(m.name for m in models if m.state == "loading"),
            zmq=f"{host}:{self._zmq_port}",
            http=f"{host}:{self._http_port}",
            peer=f"{host}:{self.server.port}",
            generation=self._generation,
            leaving=self.node.draining,
        )

    # -- routing (called by the Node for requests from its own clients) -------------------

    def members(self) -> list[ClusterMember]:
        """Return the members; this node's own entry with its live state, not its last gossip."""
        members = self.runner.members()
        return [
            dataclasses.replace(m, meta=self._meta()) if m.name == self.name else m for m in members
        ]

    def route(self, model: str) -> Route:
        return route(self.members(), model, self.name)

    def holds_elsewhere(self, model: str) -> bool:
        """Return whether a peer (alive, not leaving) holds `model`."""
        return self.route(model).kind == RouteKind.FORWARD

    async def serve_remote(
        self, req: InferRequest, *, stream: bool
    ) -> AsyncGenerator[StreamItem, None]:
        """Serve a request for a model this node does not hold: forward, or place then forward."""
        if not stream:
            yield await self.infer_remote(req)
            return
        nodes = await self._destination(req.model)
        if nodes == (self.name,):
            async with contextlib.aclosing(self.node.serve_local(req, stream=True)) as items:
                async for item in items:
                    yield item
            return
        async with contextlib.aclosing(self._forward_stream(req, nodes)) as items:
            async for item in items:
                yield item

    async def infer_remote(self, req: InferRequest) -> InferResult:
        """Run a whole inference for a model this node does not hold (forward or place)."""
        # A coroutine, not serve_remote's generator: the non-streaming hot path of forwarding.
        nodes = await self._destination(req.model)
        if nodes == (self.name,):
            return await self.peer_infer(req)
        candidates = self._candidates(nodes)
        for attempt, holder in enumerate(candidates, 1):
            try:
                return await self.client.infer(
                    self._peer_address(holder), req, timeout=self._timeout
                )
            except PeerUnavailable as exc:
                if attempt == len(candidates):
                    raise
                forward_retries_total.labels("infer").inc()
                log.info("forwarding %s: %s; trying the next holder", req.model, exc)
        raise AssertionError("unreachable: candidates is never empty")

    async def _destination(self, model: str) -> tuple[str, ...]:
        """Return the holders to try in order (this node alone if it was placed here)."""
        # The hot path of forwarding: the node has just checked its own board, so only the
        # peers' gossip is read here (building this node's live metadata costs more).
        peers = holders(self.runner.members(), model, exclude=self.name)
        if peers:
            return tuple(peers)
        decision = self.route(model)
        if decision.kind == RouteKind.WAIT:
            decision = await self._await_load(model, decision)
        if decision.kind == RouteKind.LOAD:
            return (await self._place(model),)
        return decision.nodes

    def _candidates(self, nodes: tuple[str, ...]) -> list[str]:
        return [n for n in nodes if n != self.name] or list(nodes)

    async def _forward_stream(
        self, req: InferRequest, nodes: tuple[str, ...]
    ) -> AsyncGenerator[StreamItem, None]:
        """Stream from the first holder that acknowledges; one that fails before its first
        item is replaced by the next, one that fails later ends the request with its error."""
        candidates = self._candidates(nodes)
        for attempt, holder in enumerate(candidates, 1):
            started = False
            try:
                async with contextlib.aclosing(
                    self.client.stream(self._peer_address(holder), req, timeout=self._timeout)
                ) as items:
                    async for item in items:
                        started = True
                        yield item
                return
            except PeerUnavailable as exc:
                if started or attempt == len(candidates):
                    raise
                forward_retries_total.labels("stream").inc()
                log.info("forwarding %s: %s; trying the next holder", req.model, exc)

    def _peer_address(self, name: str) -> PeerAddress:
        member = self.runner.member(name)
        if member is None or member.meta is None or not member.meta.peer:
            raise PeerUnavailable(f"node {name} is not known or has no peer address")
        return PeerAddress(name, member.meta.peer)

    async def _await_load(self, model: str, decision: Route) -> Route:
        """Wait (with the request timeout) for a peer's load in progress, then route again."""
        deadline = time.monotonic() + self._timeout
        while decision.kind == RouteKind.WAIT and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the gossiped state with a deadline
            decision = self.route(model)
        return decision

    async def place(self, model: str) -> str:
        """Make sure `model` is loaded somewhere in the cluster; return the holder's name.

        Nodes without the model's file are skipped by the primary (their load fails), so a
        model a learning job wrote on one node ends up there unless another has the file too.
        """
        decision = self.route(model)
        if decision.kind in (RouteKind.LOCAL, RouteKind.FORWARD):
            return decision.nodes[0]
        holder = await self._place(model)
        if holder == self.name and self.node.model_info(model) is not None:
            info = self.node.model_info(model)
            if info is not None and info.state != "loaded":
                with contextlib.suppress(ModelAlreadyLoaded):  # the fallback: load it here
                    await self.node.load(LoadRequest(name=model))
        return holder

    async def _place(self, model: str) -> str:
        """Ask the primary where `model` goes (one load cluster-wide); return the holder."""
        primary = await self._await_primary()
        if primary is None:
            if self._has_majority():
                # A majority is here, so a primary is about to be elected: placing now would
                # break "one load per model". The client retries shortly.
                raise NoPrimary(f"no primary yet to place {model!r}: retry in a moment")
            if self.node.in_catalog(model):
                log.info("no majority on this side: loading %s locally", model)
                return self.name
            raise NoPrimary(
                f"model {model!r} is loaded nowhere and no primary can place it "
                "(this side of the cluster has no majority of the voters)"
            )
        name, _term = primary
        if name == self.name:
            return await self.peer_place(model)
        return await self.client.place(self._peer_address(name), model, timeout=self._timeout)

    async def _await_primary(self) -> tuple[str, int] | None:
        """Wait (about one lease and two election rounds) for a primary to be known."""
        patience = self.config.lease_s + 2 * self.config.election_retry_s
        deadline = time.monotonic() + patience
        primary = self.runner.primary()
        while primary is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the election's state with a deadline
            primary = self.runner.primary()
        return primary

    def _has_majority(self) -> bool:
        """Return whether this node sees a majority of the voters alive (itself included)."""
        voters = set(self.config.voters)
        if not voters:
            return False
        alive = {m.name for m in self.members() if m.state == MemberState.ALIVE} | {self.name}
        return len(voters & alive) > len(voters) // 2

    # -- the peer RPC handler: requests from other nodes ----------------------------------

    async def peer_infer(self, req: InferRequest) -> InferResult:
        return await self.node.infer_local(req)

    def peer_infer_stream(self, req: InferRequest) -> AsyncGenerator[StreamItem, None]:
        return self.node.serve_local(req, stream=True)

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo:
        """Load on the primary's command, refusing commands from a deposed primary's term."""
        if term is None or not self.runner.fence.admit(term):
            raise StaleTerm(
                f"placement of {req.name!r} carries term {term}, older than "
                f"{self.runner.fence.highest}: refused"
            )
        try:
            return await self.node.load(req)
        except ModelAlreadyLoaded:
            info = self.node.model_info(req.name)
            assert info is not None
            return info

    async def peer_restore(self, model: str, node: str) -> str:
        """As the primary: say where `model`, which restarting `node` remembers, belongs.

        A node that holds it, is loading it or is being sent it by a placement in flight keeps
        it; otherwise `node` restores it, and placements asked for meanwhile wait for that load
        (reserved like a placement of our own) instead of starting a second copy elsewhere.
        """
        if not self.runner.is_primary():
            raise NoPrimary(f"{self.name} is not the primary: it cannot reserve {model!r}")
        running = self._placing.get(model)
        if running is not None:
            return await asyncio.shield(running)
        decision = self.route(model)
        if decision.kind != RouteKind.LOAD:
            return decision.nodes[0]
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._placing[model] = future
        task = asyncio.create_task(self._reserve(model, node, future))
        self._reservations.add(task)
        task.add_done_callback(self._reservations.discard)
        return node

    async def _reserve(self, model: str, node: str, future: asyncio.Future[str]) -> None:
        """Hold `model`'s placement for `node` until its gossip shows the load (or a timeout)."""
        try:
            decision = self.route(model)
            deadline = time.monotonic() + RESERVE_S
            while decision.kind == RouteKind.LOAD and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # polling the gossiped state with a deadline
                decision = self.route(model)
            if decision.kind == RouteKind.LOAD:
                future.set_exception(NoPrimary(f"{node} did not restore {model!r}: ask again"))
                future.exception()  # retrieved: waiters get it; no "never retrieved" warning
            else:
                future.set_result(decision.nodes[0])
        finally:
            if not future.done():
                future.cancel()
            del self._placing[model]

    async def peer_place(self, model: str) -> str:
        """As the primary: have `model` loaded on the best node, once however many ask."""
        running = self._placing.get(model)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._placing[model] = future
        try:
            holder = await self._place_once(model)
            future.set_result(holder)
            return holder
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it; no "never retrieved" warning
            raise
        finally:
            del self._placing[model]

    async def _place_once(self, model: str) -> str:
        decision = self.route(model)
        if decision.kind in (RouteKind.LOCAL, RouteKind.FORWARD):
            return decision.nodes[0]
        if decision.kind == RouteKind.WAIT:
            decision = await self._await_load(model, decision)
            if decision.kind in (RouteKind.LOCAL, RouteKind.FORWARD):
                return decision.nodes[0]
        if not self.runner.is_primary():
            raise NoPrimary("this node is no longer the primary: ask again")
        term = self.runner.election.term
        # Reading the model file's header: off the loop, which keeps answering peers meanwhile.
        loop = asyncio.get_running_loop()
        need = await loop.run_in_executor(None, self.node.estimate_mb, model) or 0.0
        failures: dict[str, Exception] = {}
        while True:
            members = [m for m in self.members() if takes_work(m)]
            target = choose_load_target(int(need), members, exclude=set(failures))
            if target is None:
                raise placement_failure(model, need, failures)
            log.info("placing %s on %s/%s (term %d)", model, target.node, target.device, term)
            try:
                if target.node == self.name:
                    await self.peer_load(LoadRequest(name=model), term)
                else:
                    peer = self._peer_address(target.node)
                    await self.client.load(peer, LoadRequest(name=model), term, self._timeout)
                return target.node
            except (ModelNotFound, PeerUnavailable, InsufficientMemory) as exc:
                failures[target.node] = exc
                log.info(
                    "placing %s on %s failed (%s); trying another node", model, target.node, exc
                )

    # -- the view ---------------------------------------------------------------------------

    def view(self) -> dict[str, object]:
        """The /cluster document: members, primary and term, who holds which model."""
        primary = self.runner.primary()
        members = []
        held: dict[str, list[str]] = {}
        for m in sorted(self.members(), key=lambda m: m.name):
            meta = m.meta
            for model in meta.loaded if meta is not None else ():
                held.setdefault(model.name, []).append(m.name)
            members.append(
                {
                    "name": m.name,
                    "state": "leaving"
                    if meta is not None and meta.leaving and m.state.name == "ALIVE"
                    else m.state.name.lower(),
                    "incarnation": m.incarnation,
                    "address": f"{m.addr[0]}:{m.addr[1]}",
                    "generation": meta.generation if meta else None,
                    "http": meta.http if meta else None,
                    "devices": [
                        {
                            "name": d.name,
                            "total_mb": d.total_mb,
                            "free_mb": d.free_mb,
                            "claimed_mb": d.claimed_mb,
                            "used_mb": d.total_mb - d.free_mb,
                        }
                        for d in (meta.devices if meta else ())
                    ],
                    "models": [
                        {"name": x.name, "state": "loaded", "queued": x.queue}
                        for x in (meta.loaded if meta else ())
                    ]
                    + [
                        {"name": x, "state": "loading", "queued": 0}
                        for x in (meta.loading if meta else ())
                    ],
                }
            )
        return {
            "enabled": True,
            "self": self.name,
            "primary": None if primary is None else {"name": primary[0], "term": primary[1]},
            "term": self.runner.term,
            "members": members,
            "models": held,
            "dropped": self.runner.dropped(),
        }
