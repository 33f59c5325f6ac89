"""Where a request or a load should go, decided from the gossiped metadata alone (pure).

Only alive members that are not leaving take new work. A member whose metadata is missing or
undecodable is treated as holding nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from cluster.messages import Address, MemberState
from cluster.meta import NodeMeta

__all__ = [
    "choose_load_target",
    "claimed_primary",
    "ClusterMember",
    "holders",
    "loading_on",
    "LoadTarget",
    "route",
    "Route",
    "RouteKind",
    "takes_work",
]


@dataclass(frozen=True, slots=True)
class ClusterMember:
    """One member as the runner reports it: membership state plus decoded metadata."""

    name: str
    addr: Address
    state: MemberState
    incarnation: int
    meta: NodeMeta | None


class RouteKind(enum.Enum):
    """What to do with a request for a model."""

    LOCAL = "local"
    """This node holds it: serve here."""
    FORWARD = "forward"
    """Peers hold it: forward to `nodes[0]`, the rest are fallbacks in order."""
    WAIT = "wait"
    """Nobody holds it but `nodes` are loading it: wait for the load, then forward."""
    LOAD = "load"
    """Nobody holds or loads it: ask the primary to place it."""


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision and the nodes it names, best first."""

    kind: RouteKind
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadTarget:
    """Where the primary should load a model: a node and one of its devices."""

    node: str
    device: str
    free_mb: int


def takes_work(m: ClusterMember) -> bool:
    """Return whether a member may be given new requests or loads."""
    return m.state == MemberState.ALIVE and m.meta is not None and not m.meta.leaving


def _free_mb(meta: NodeMeta) -> int:
    return sum(d.free_mb for d in meta.devices)


def holders(
    members: Iterable[ClusterMember], model: str, *, exclude: str | None = None
) -> list[str]:
    """Return the members that have `model` loaded, least loaded first.

    Order: the model's queue depth, then the most free memory, then the name (stable).
    """
    found: list[tuple[int, int, str]] = []
    for m in members:
        if m.name == exclude or not takes_work(m):
            continue
        assert m.meta is not None
        queue = m.meta.queue_of(model)
        if queue is not None:
            found.append((queue, -_free_mb(m.meta), m.name))
    return [name for _, _, name in sorted(found)]


def loading_on(members: Iterable[ClusterMember], model: str) -> list[str]:
    """Return the alive members that advertise `model` as loading, by name."""
    return sorted(
        m.name
        for m in members
        if m.state == MemberState.ALIVE and m.meta is not None and model in m.meta.loading
    )


def choose_load_target(
    model_need_mb: int,
    members: Iterable[ClusterMember],
    has_file: Callable[[str], bool] | None = None,
    *,
    exclude: Collection[str] = (),
) -> LoadTarget | None:
    """Return the device with the most free memory that fits the model, or None.

    A model is never split across devices, so one device must fit it whole. `has_file(node)`,
    when given, rules out nodes without the model file. Ties go to the lower node, then device,
    name, so every primary decides the same.
    """
    best: tuple[int, str, str] | None = None
    for m in members:
        if m.name in exclude or not takes_work(m):
            continue
        if has_file is not None and not has_file(m.name):
            continue
        assert m.meta is not None
        for d in m.meta.devices:
            if d.free_mb < model_need_mb:
                continue
            key = (-d.free_mb, m.name, d.name)
            if best is None or key < best:
                best = key
    if best is None:
        return None
    return LoadTarget(best[1], best[2], -best[0])


def claimed_primary(members: Iterable[ClusterMember], local: str) -> tuple[str, int] | None:
    """Return (name, term) of the primary that other members' metadata claims, or None.

    Alive members other than `local` only, with a term above 0; the highest term wins and a tie
    goes to the member met first. Gossip can lag a lease by a round: a placement command still
    carries its term through the `Fence`.
    """
    best: tuple[int, str] | None = None
    for m in members:
        if m.name == local or m.state != MemberState.ALIVE:
            continue
        if m.meta is None or m.meta.primary_term == 0:
            continue
        if best is None or m.meta.primary_term > best[0]:
            best = (m.meta.primary_term, m.name)
    return None if best is None else (best[1], best[0])


def route(members: Collection[ClusterMember], model: str, local: str) -> Route:
    """Return how the node named `local` should serve a request for `model`."""
    for m in members:
        if m.name == local and m.meta is not None and m.meta.queue_of(model) is not None:
            return Route(RouteKind.LOCAL, (local,))
    peers = holders(members, model, exclude=local)
    if peers:
        return Route(RouteKind.FORWARD, tuple(peers))
    loading = loading_on(members, model)
    if loading:
        return Route(RouteKind.WAIT, tuple(loading))
    return Route(RouteKind.LOAD)
