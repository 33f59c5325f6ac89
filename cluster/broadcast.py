"""The transmit-limited broadcast queue (memberlist queue.go), pure.

Each queued message is piggybacked on outgoing packets until it has been sent
`retransmit_base + retransmit_mult * ceil(log10(N + 1))` times (memberlist has no base; see
`ClusterConfig.retransmit_base`). Every packet counts as one transmit, whether a gossip packet
to one of the round's targets or a probe or ack it rides on, as memberlist counts them. Least-sent
messages go first (then larger, then newer), and a new message about a node replaces any queued
message about the same node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.config import retransmit_limit
from cluster.messages import Message


@dataclass(slots=True)
class _Entry:
    key: str
    message: Message
    size: int
    order: int
    transmits: int = 0


@dataclass(slots=True)
class BroadcastQueue:
    """Queued broadcasts keyed by the node they are about."""

    retransmit_mult: int
    retransmit_base: int = 0
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _order: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    def queue(self, key: str, message: Message, size: int) -> None:
        """Queue `message` about node `key`, replacing an older one about the same node."""
        self._order += 1
        self._entries[key] = _Entry(key, message, size, self._order)

    def drop(self, key: str) -> None:
        """Forget the queued message about `key`, if any."""
        self._entries.pop(key, None)

    def limit(self, n: int) -> int:
        """Return the transmit limit for a cluster of n members."""
        return retransmit_limit(self.retransmit_mult, n, self.retransmit_base)

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
        ranked = sorted(self._entries.values(), key=lambda e: (e.transmits, -e.size, -e.order))
        out: list[Message] = []
        used = 0
        for entry in ranked:
            cost = entry.size + per_message_overhead
            if used + cost > budget:
                # A smaller message further down may still fit.
                continue
            if accept is not None and not accept(entry.key):
                continue
            used += cost
            out.append(entry.message)
            entry.transmits += 1
            if entry.transmits >= limit:
                del self._entries[entry.key]
        return out

    def pending(self) -> list[tuple[str, Message, int]]:
        """Return (key, message, transmits) for every queued message (for inspection)."""
        return [(e.key, e.message, e.transmits) for e in self._entries.values()]
