"""Restore after a restart: which remembered models a node loads again, and which peers keep.

`plan_restore` decides from the gossiped view (pure); `clear_restore` waits for that view and
clears each model the view leaves here with the primary, which serialises placements.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from actors.errors import MocError
from actors.serving.store import LoadedRecord
from cluster.routing import ClusterMember, takes_work
from moc_node.clustered.link import ClusterLink

log = logging.getLogger(__name__)

Reserve = Callable[[str, str], Awaitable[str]]
"""As the primary: reserve `model` for restarting `node`; return where it belongs."""


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


async def clear_restore(
    link: ClusterLink, reserve: Reserve, records: Sequence[LoadedRecord]
) -> RestorePlan:
    """Wait until joined (the view is known), then decide which of `records` to restore.

    The view misses a placement the primary began just before we joined (its target has
    not gossiped "loading" yet), so each unpinned model the view leaves to us is cleared
    with the primary when one is known; `reserve` answers when this node is the primary.
    """
    if not any(not r.pinned for r in records):  # only then does the cluster matter
        return plan_restore(records, link.runner.members(), link.name)
    await link.await_joined()
    plan = plan_restore(records, link.runner.members(), link.name)
    pinned = {r.name for r in records if r.pinned}
    skip = dict(plan.skip)
    # All at once: a primary that stopped answering costs one ack timeout, not one per model.
    asked = [m for m in plan.restore if m not in pinned]
    answers = await asyncio.gather(*(_ask_primary(link, reserve, m) for m in asked))
    for model, holder in zip(asked, answers, strict=True):
        if holder is not None and holder != link.name:
            skip[model] = holder
    return RestorePlan(tuple(m for m in plan.restore if m not in skip), skip)


async def _ask_primary(link: ClusterLink, reserve: Reserve, model: str) -> str | None:
    """Ask the primary where `model` belongs; None if there is none or it cannot say."""
    primary = link.runner.primary()
    if primary is None:
        return None
    try:
        if primary[0] == link.name:
            return await reserve(model, link.name)
        peer = link.peer_address(primary[0])
        return await link.client.restore(peer, model, link.name, link.timeout)
    except MocError as exc:  # no answer: the view's plan stands
        log.info("could not clear restoring %s with the primary: %s", model, exc)
        return None


__all__ = ["RestorePlan", "clear_restore", "plan_restore"]
