"""The /cluster document of a clustered node: members, primary and term, who holds which model.

A pure function of the members this node sees and the election's answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cluster.routing import ClusterMember


def member_json(m: ClusterMember) -> dict[str, Any]:
    """One member as /cluster lists it (a leaving member that is still alive says "leaving")."""
    meta = m.meta
    leaving = meta is not None and meta.leaving and m.state.name == "ALIVE"
    return {
        "name": m.name,
        "state": "leaving" if leaving else m.state.name.lower(),
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
        + [{"name": x, "state": "loading", "queued": 0} for x in (meta.loading if meta else ())],
    }


def cluster_document(
    members: Iterable[ClusterMember],
    *,
    me: str,
    primary: tuple[str, int] | None,
    term: int,
    dropped: Mapping[str, int],
) -> dict[str, Any]:
    """Describe the cluster as node `me` sees it (transports.api.NodeAPI.cluster_view)."""
    held: dict[str, list[str]] = {}
    listed = []
    for m in sorted(members, key=lambda m: m.name):
        for model in m.meta.loaded if m.meta is not None else ():
            held.setdefault(model.name, []).append(m.name)
        listed.append(member_json(m))
    return {
        "enabled": True,
        "self": me,
        "primary": None if primary is None else {"name": primary[0], "term": primary[1]},
        "term": term,
        "members": listed,
        "models": held,
        "dropped": dict(dropped),
    }


__all__ = ["cluster_document", "member_json"]
