"""Placement: one load per model cluster-wide, decided by the primary; reservations for restarts.

Any node asks the primary where a model goes (`place`); the primary picks a node with room
(`cluster.routing.choose_load_target`, pure) and commands the load under its term, which a node
refuses from a deposed primary (`load_on_command`). A restarting node that remembers a model
has it reserved while it loads it again (`reserve_for_restore`), so no second copy starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

from actors.errors import InsufficientMemory, MocError, ModelAlreadyLoaded, ModelNotFound
from actors.types import LoadRequest, ModelInfo
from cluster.routing import RouteKind, choose_load_target, takes_work
from moc_node.clustered.link import ClusterLink
from moc_node.node import LocalNode
from transports.peer_wire import PeerUnavailable

log = logging.getLogger(__name__)


class StaleTerm(MocError):
    """A placement command carried an older term than this node has seen: a deposed primary."""

    code = "stale_term"


class NoPrimary(MocError):
    """No primary is known (this side of a partition has no majority): nothing can be placed."""

    code = "no_primary"


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


class Placement:
    """Ask for, decide (as the primary) and carry out placements; keep restore reservations."""

    def __init__(self, link: ClusterLink, local: LocalNode) -> None:
        self._link = link
        self._local = local
        # Model -> the placement (or reservation) in flight: later askers wait for its answer.
        self._placing: dict[str, asyncio.Future[str]] = {}
        self._reservations: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        """Drop the reservations held (their waiters are told to ask again)."""
        for task in list(self._reservations):
            task.cancel()

    # -- any node -----------------------------------------------------------------------------

    async def place(self, model: str) -> str:
        """Make sure `model` is loaded somewhere in the cluster; return the holder's name.

        Nodes without the model's file are skipped by the primary (their load fails), so a
        model a learning job wrote on one node ends up there unless another has the file too.
        """
        decision = self._link.route(model)
        if decision.kind in (RouteKind.LOCAL, RouteKind.FORWARD):
            return decision.nodes[0]
        holder = await self.place_via_primary(model)
        if holder == self._link.name:
            info = self._local.model_info(model)
            if info is not None and info.state != "loaded":
                with contextlib.suppress(ModelAlreadyLoaded):  # the fallback: load it here
                    await self._local.load(LoadRequest(name=model))
        return holder

    async def place_via_primary(self, model: str) -> str:
        """Ask the primary where `model` goes (one load cluster-wide); return the holder."""
        link = self._link
        primary = await link.await_primary()
        if primary is None:
            if link.has_majority():
                # A majority is here, so a primary is about to be elected: placing now would
                # break "one load per model". The client retries shortly.
                raise NoPrimary(f"no primary yet to place {model!r}: retry in a moment")
            if self._local.in_catalog(model):
                log.info("no majority on this side: loading %s locally", model)
                return link.name
            raise NoPrimary(
                f"model {model!r} is loaded nowhere and no primary can place it "
                "(this side of the cluster has no majority of the voters)"
            )
        name, _term = primary
        if name == link.name:
            return await self.place_as_primary(model)
        return await link.client.place(link.peer_address(name), model, timeout=link.timeout)

    async def load_on_command(self, req: LoadRequest, term: int | None) -> ModelInfo:
        """Load on the primary's command, refusing commands from a deposed primary's term."""
        fence = self._link.runner.fence
        if term is None or not fence.admit(term):
            raise StaleTerm(
                f"placement of {req.name!r} carries term {term}, older than "
                f"{fence.highest}: refused"
            )
        try:
            return await self._local.load(req)
        except ModelAlreadyLoaded:
            info = self._local.model_info(req.name)
            assert info is not None
            return info

    # -- the primary --------------------------------------------------------------------------

    async def place_as_primary(self, model: str) -> str:
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

    async def reserve_for_restore(self, model: str, node: str) -> str:
        """As the primary: say where `model`, which restarting `node` remembers, belongs.

        A node that holds it, is loading it or is being sent it by a placement in flight keeps
        it; otherwise `node` restores it, and placements asked for meanwhile wait for that load
        (reserved like a placement of our own) instead of starting a second copy elsewhere.
        """
        if not self._link.runner.is_primary():
            raise NoPrimary(f"{self._link.name} is not the primary: it cannot reserve {model!r}")
        running = self._placing.get(model)
        if running is not None:
            return await asyncio.shield(running)
        decision = self._link.route(model)
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
            decision = self._link.route(model)
            deadline = time.monotonic() + self._link.config.reservation_s
            while decision.kind == RouteKind.LOAD and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # polling the gossiped state with a deadline
                decision = self._link.route(model)
            if decision.kind == RouteKind.LOAD:
                future.set_exception(NoPrimary(f"{node} did not restore {model!r}: ask again"))
                future.exception()  # retrieved: waiters get it; no "never retrieved" warning
            else:
                future.set_result(decision.nodes[0])
        finally:
            if not future.done():
                future.cancel()
            del self._placing[model]

    async def _place_once(self, model: str) -> str:
        link = self._link
        decision = link.route(model)
        if decision.kind in (RouteKind.LOCAL, RouteKind.FORWARD):
            return decision.nodes[0]
        if decision.kind == RouteKind.WAIT:
            decision = await link.await_load(model, decision)
            if decision.kind in (RouteKind.LOCAL, RouteKind.FORWARD):
                return decision.nodes[0]
        if not link.runner.is_primary():
            raise NoPrimary("this node is no longer the primary: ask again")
        term = link.runner.election.term
        # Reading the model file's header: off the loop, which keeps answering peers meanwhile.
        loop = asyncio.get_running_loop()
        need = await loop.run_in_executor(None, self._local.estimate_mb, model) or 0.0
        failures: dict[str, Exception] = {}
        while True:
            members = [m for m in link.members() if takes_work(m)]
            target = choose_load_target(int(need), members, exclude=set(failures))
            if target is None:
                raise placement_failure(model, need, failures)
            log.info("placing %s on %s/%s (term %d)", model, target.node, target.device, term)
            try:
                if target.node == link.name:
                    await self.load_on_command(LoadRequest(name=model), term)
                else:
                    peer = link.peer_address(target.node)
                    await link.client.load(peer, LoadRequest(name=model), term, link.timeout)
                return target.node
            except (ModelNotFound, PeerUnavailable, InsufficientMemory) as exc:
                failures[target.node] = exc
                log.info(
                    "placing %s on %s failed (%s); trying another node", model, target.node, exc
                )


__all__ = ["NoPrimary", "Placement", "StaleTerm", "placement_failure"]
