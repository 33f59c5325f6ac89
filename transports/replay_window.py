"""The peer RPC's replay window: which signed requests a node has already taken (pure).

A signed frame is accepted while its timestamp is within `span_s` of the receiver's clock (the
skew check in `peer_wire.open_frames`), so a captured frame could be sent again until then. The
window remembers every request taken (sender, request id, operation: the request id is the
sender's nonce) until its timestamp is `span_s` behind, and refuses one it holds.

Memory is bounded: at `capacity` requests the one with the oldest timestamp is forgotten and the
window's floor rises to that timestamp; frames stamped at or before the floor are refused from
then on, since the window can no longer tell them from replays. Under a flood the window shrinks
(refusing only frames older than the flood's oldest remembered one) instead of growing or
letting a replay through. A new window starts with its floor at its creation time: a frame
sealed before this process started could have been taken by its previous incarnation.

Compact, since a busy node holds tens of thousands: a request is a 64-bit digest of its key in a
set, and one int in a heap that packs its timestamp's exact bits above that digest. ~120 bytes
a request, measured, where the key tuple, its fresh strings and a (float, tuple) heap entry took
~310 (bench/fuzz.py saw the difference in the node's RSS). The digest is the key's `hash`: its
strings' SipHash is keyed per process, so no one can craft colliding ids offline, and two keys
sharing a digest (odds ~n / 2^64 a frame, n held) only make that fresh frame refused as a
replay; a replay is never taken.

No clock here: callers pass `now` and the frame's timestamp, both in seconds.
"""

from __future__ import annotations

import heapq
import struct

__all__ = ["DEFAULT_CAPACITY", "ReplayWindow", "RequestKey"]

RequestKey = tuple[str, str, int]
"""(sender's node name, request id, operation code): the request id is unique per sender."""

DEFAULT_CAPACITY = 65_536
"""Requests kept at most (~120 bytes each, measured: ~7.5 MiB full; ~1.6 us per admit, 1.2 with
the tuple heap this replaced). A forwarded request is one; at the peer RPC's one-connection
rate (~3,600 requests/s measured, bench/peer_rpc.py) the floor then trails the clock by ~18 s,
so a fresh frame is never refused; a flood beyond it only makes late frames refused."""

_DIGEST = (1 << 64) - 1
_MAGNITUDE = (1 << 63) - 1
_DOUBLE = struct.Struct("<d")
_INT64 = struct.Struct("<q")


def _order(ts: float) -> int:
    """Return the int64 of `ts`'s bits, made to sort as `ts` does (negatives' magnitude flipped)."""
    bits: int = _INT64.unpack(_DOUBLE.pack(ts))[0]
    return bits if bits >= 0 else bits ^ _MAGNITUDE


def _stamp(order: int) -> float:
    """Return the timestamp `_order` gave `order` for, exactly."""
    ts: float = _DOUBLE.unpack(_INT64.pack(order if order >= 0 else order ^ _MAGNITUDE))[0]
    return ts


class ReplayWindow:
    """Requests seen within the last `span_s` seconds, at most `capacity` of them."""

    __slots__ = ("span_s", "capacity", "floor", "_seen", "_by_ts")

    def __init__(self, span_s: float, capacity: int = DEFAULT_CAPACITY, *, floor: float) -> None:
        if span_s <= 0 or capacity < 1:
            raise ValueError("a replay window needs a positive span and capacity")
        self.span_s = span_s
        self.capacity = capacity
        self.floor = floor
        """Frames stamped at or before this are refused: the window cannot vouch for them."""
        self._seen: set[int] = set()  # the digests of the requests held
        self._by_ts: list[int] = []  # a heap of _order(ts) << 64 | digest: the oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, key: RequestKey, ts: float, now: float) -> bool:
        """Remember `key` and return True the first time; False for a replay or a frame the
        window cannot vouch for (stamped at or before the floor, or more than the span from
        `now`: the skew check refuses those first, and a far-future one would stay too long;
        a NaN stamp, which would sit in the heap and stop expiry, compares false and is refused)."""
        self._expire(now)
        if not (ts > self.floor and abs(now - ts) <= self.span_s):
            return False
        digest = hash(key) & _DIGEST
        if digest in self._seen:
            return False
        if len(self._seen) >= self.capacity:
            oldest = heapq.heappop(self._by_ts)
            self._seen.discard(oldest & _DIGEST)
            self.floor = max(self.floor, _stamp(oldest >> 64))
            if ts <= self.floor:
                return False
        self._seen.add(digest)
        heapq.heappush(self._by_ts, _order(ts) << 64 | digest)
        return True

    def _expire(self, now: float) -> None:
        """Forget requests whose frames are too old to pass the skew check any more."""
        horizon = _order(now - self.span_s) << 64  # below any entry stamped at the horizon
        heap = self._by_ts
        while heap and heap[0] < horizon:
            self._seen.discard(heapq.heappop(heap) & _DIGEST)
