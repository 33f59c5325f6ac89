"""The transmit-limited broadcast queue (memberlist queue.go), pure.

Each queued message is piggybacked on outgoing packets until it has been sent
`retransmit_mult * ceil(log10(N + 1))` times. Least-sent messages go first (then larger, then
newer), and a new message about a node replaces any queued message about the same node.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.messages import Message


@dataclass(slots=True)
class _Entry:
    key: str
    message: Message
    size: int
    order: int
    transmits: int = 0

    def rank(self) -> tuple[int, int, int]:
        """Return the send order: least sent, then largest, then newest (unique by order)."""
        return (self.transmits, -self.size, -self.order)


@dataclass(slots=True)
class BroadcastQueue:
    """Queued broadcasts keyed by the node they are about."""

    retransmit_mult: int
    _entries: dict[str, _Entry] = field(default_factory=dict)
    # Kept sorted by rank, as memberlist keeps a btree: a take is a walk, not a sort of the
    # whole queue (after a join at N = 1000 every node holds about 1000 broadcasts).
    _ranked: list[tuple[tuple[int, int, int], _Entry]] = field(default_factory=list)
    _order: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    def queue(self, key: str, message: Message, size: int) -> None:
        """Queue `message` about node `key`, replacing an older one about the same node."""
        self._order += 1
        self.drop(key)
        entry = _Entry(key, message, size, self._order)
        self._entries[key] = entry
        bisect.insort(self._ranked, (entry.rank(), entry))

    def drop(self, key: str) -> None:
        """Forget the queued message about `key`, if any."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._unrank(entry)

    def limit(self, n: int) -> int:
        """Return the transmit limit for a cluster of n members."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def take(
        self,
        budget: int,
        n: int,
        per_message_overhead: int = 0,
        accept: Callable[[str], bool] | None = None,
    ) -> list[Message]:
        """Return messages fitting in `budget` bytes and count one transmit for each.

        `accept(key)` can exclude messages (for instance those about the packet's recipient that
        it already knows). Messages reaching the limit for n members leave the queue.
        """
        if not self._entries or budget <= 0:
            return []
        limit = self.limit(n)
        taken: list[_Entry] = []
        used = 0
        for _, entry in self._ranked:
            cost = entry.size + per_message_overhead
            if used + cost > budget:
                # A smaller message further down may still fit.
                continue
            if accept is not None and not accept(entry.key):
                continue
            used += cost
            taken.append(entry)
        # Re-rank after the walk (memberlist reinserts after its scan for the same reason).
        for entry in taken:
            self._unrank(entry)
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._entries[entry.key]
            else:
                bisect.insort(self._ranked, (entry.rank(), entry))
        return [entry.message for entry in taken]

    def pending(self) -> list[tuple[str, Message, int]]:
        """Return (key, message, transmits) for every queued message (for inspection)."""
        return [(e.key, e.message, e.transmits) for e in self._entries.values()]

    def _unrank(self, entry: _Entry) -> None:
        i = bisect.bisect_left(self._ranked, (entry.rank(),))
        assert self._ranked[i][1] is entry, "broadcast queue rank out of step"
        del self._ranked[i]
