"""The peer RPC's replay window: which signed requests a node has already taken (pure).

A signed frame is accepted while its timestamp is within `span_s` of the receiver's clock (the
skew check in `peer_wire.open_frames`), so a captured frame could be sent again until then. The
window remembers the key of every request taken (sender, request id, operation: the request id is
the sender's nonce) until its timestamp is `span_s` behind, and refuses a key it holds.

Memory is bounded: at `capacity` keys the one with the oldest timestamp is forgotten and the
window's floor rises to that timestamp; frames stamped at or before the floor are refused from
then on, since the window can no longer tell them from replays. Under a flood the window shrinks
(refusing only frames older than the flood's oldest remembered one) instead of growing or
letting a replay through. A new window starts with its floor at its creation time: a frame
sealed before this process started could have been taken by its previous incarnation.

No clock here: callers pass `now` and the frame's timestamp, both in seconds.
"""

from __future__ import annotations

import heapq

__all__ = ["DEFAULT_CAPACITY", "ReplayWindow", "RequestKey"]

RequestKey = tuple[str, str, int]
"""(sender's node name, request id, operation code): the request id is unique per sender."""

DEFAULT_CAPACITY = 65_536
"""Keys kept at most (~250 bytes each, measured: ~16 MiB full; 1-2 us per admit). A forwarded request is one key; at the
peer RPC's one-connection rate (~3,600 requests/s measured, bench/peer_rpc.py) the floor then
trails the clock by ~18 s, so a fresh frame is never refused; a flood beyond it only makes
late frames refused."""


class ReplayWindow:
    """Request keys seen within the last `span_s` seconds, at most `capacity` of them."""

    __slots__ = ("span_s", "capacity", "floor", "_seen", "_by_ts")

    def __init__(self, span_s: float, capacity: int = DEFAULT_CAPACITY, *, floor: float) -> None:
        if span_s <= 0 or capacity < 1:
            raise ValueError("a replay window needs a positive span and capacity")
        self.span_s = span_s
        self.capacity = capacity
        self.floor = floor
        """Frames stamped at or before this are refused: the window cannot vouch for them."""
        self._seen: set[RequestKey] = set()
        self._by_ts: list[tuple[float, RequestKey]] = []  # a heap: the oldest timestamp first

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, key: RequestKey, ts: float, now: float) -> bool:
        """Remember `key` and return True the first time; False for a replay or a frame the
        window cannot vouch for (stamped at or before the floor, or more than the span from
        `now`: the skew check refuses those first, and a far-future one would stay too long)."""
        self._expire(now)
        if ts <= self.floor or abs(now - ts) > self.span_s or key in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            oldest, gone = heapq.heappop(self._by_ts)
            self._seen.discard(gone)
            self.floor = max(self.floor, oldest)
            if ts <= self.floor:
                return False
        self._seen.add(key)
        heapq.heappush(self._by_ts, (ts, key))
        return True

    def _expire(self, now: float) -> None:
        """Forget keys whose frames are too old to pass the skew check any more."""
        horizon = now - self.span_s
        heap = self._by_ts
        while heap and heap[0][0] < horizon:
            self._seen.discard(heapq.heappop(heap)[1])
