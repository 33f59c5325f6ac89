"""The cluster's election term, kept in the node's state file.

The composition layer wires the cluster's `TermStore` Protocol (cluster.election) to the serving
room's `StateStore`, so the cluster never imports actors.
"""

from __future__ import annotations

from actors.serving.store import StateStore


class TermStore:
    """The highest election term seen, kept in the state file (cluster.election.TermStore)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def load(self) -> int:
        return int(self._store.get_meta("term") or 0)

    def save(self, term: int) -> None:
        # isolation_level=None: each statement commits at once, so the term is durable here.
        self._store.set_meta("term", str(term))
