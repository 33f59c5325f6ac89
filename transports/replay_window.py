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

Its memory is fixed when it is made, so a busy node's RSS does not creep while the window fills
(bench/fuzz.py measured ~120 bytes a request with a set of ints and a heap, ~310 with key
tuples): a request is a 64-bit digest of its key in an open-addressing table (linear probing,
at most half full, deletion by backward shift) and, in arrival order, a ring of digests and
timestamps: 32 bytes of capacity each, ~2 MiB at the default capacity. The digest is the key's
`hash`: its strings' SipHash is keyed per process, so no one can craft colliding ids offline,
and two keys sharing a digest (odds ~n / 2^64 a frame, n held) only make that fresh frame
refused as a replay; a replay is never taken.

The ring forgets in arrival order, not timestamp order. A request stamped later than one that
arrived after it may be dropped first at capacity; the floor then rises to the highest stamp
ever dropped, so every dropped request's replay is still refused. Expiry stops at the first
request of the ring still within the span, so an out-of-order older one may stay a little
longer: memory stays bounded by the capacity, and holding a key longer never lets a replay in.

No clock here: callers pass `now` and the frame's timestamp, both in seconds.
"""

from __future__ import annotations

from array import array

__all__ = ["DEFAULT_CAPACITY", "ReplayWindow", "RequestKey"]

RequestKey = tuple[str, str, int]
"""(sender's node name, request id, operation code): the request id is unique per sender."""

DEFAULT_CAPACITY = 65_536
"""Requests kept at most (32 bytes each, allocated up front: 2 MiB; ~2 us per admit). A
forwarded request is one; at the peer RPC's one-connection rate (~3,600 requests/s measured,
bench/peer_rpc.py) the floor then trails the clock by ~18 s, so a fresh frame is never refused;
a flood beyond it only makes late frames refused."""

_DIGEST = (1 << 64) - 1
_EMPTY = 0  # a free cell of the table; a key whose digest is 0 is stored as 1


class ReplayWindow:
    """Requests seen within the last `span_s` seconds, at most `capacity` of them."""

    __slots__ = (
        "span_s",
        "capacity",
        "floor",
        "_table",
        "_mask",
        "_stamps",
        "_digests",
        "_head",
        "_count",
    )

    def __init__(self, span_s: float, capacity: int = DEFAULT_CAPACITY, *, floor: float) -> None:
        if span_s <= 0 or capacity < 1:
            raise ValueError("a replay window needs a positive span and capacity")
        self.span_s = span_s
        self.capacity = capacity
        self.floor = floor
        """Frames stamped at or before this are refused: the window cannot vouch for them."""
        size = 1 << (2 * capacity - 1).bit_length()  # at least twice the capacity: half full
        # Built from bytes so every page is written now, not as the window fills.
        self._table = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._stamps = array("d", bytes(8 * capacity))  # the ring, oldest arrival at _head
        self._digests = array("Q", bytes(8 * capacity))
        self._head = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def admit(self, key: RequestKey, ts: float, now: float) -> bool:
        """Remember `key` and return True the first time; False for a replay or a frame the
        window cannot vouch for (stamped at or before the floor, or more than the span from
        `now`: the skew check refuses those first, and a far-future one would stay too long;
        a NaN stamp, which would sit in the ring and stop expiry, compares false and is refused)."""
        self._expire(now)
        if not (ts > self.floor and abs(now - ts) <= self.span_s):
            return False
        digest = (hash(key) & _DIGEST) or 1
        if self._find(digest) >= 0:
            return False
        if self._count >= self.capacity:
            self.floor = max(self.floor, self._stamps[self._head])
            self._drop_oldest()
            if ts <= self.floor:
                return False
        self._insert(digest)
        tail = (self._head + self._count) % self.capacity
        self._stamps[tail] = ts
        self._digests[tail] = digest
        self._count += 1
        return True

    def _expire(self, now: float) -> None:
        """Forget requests whose frames are too old to pass the skew check any more."""
        horizon = now - self.span_s
        while self._count and self._stamps[self._head] < horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._remove(self._digests[self._head])
        self._head = (self._head + 1) % self.capacity
        self._count -= 1

    # --- the table: linear probing from the digest's low bits ---

    def _find(self, digest: int) -> int:
        """Return the cell holding `digest`, or -1."""
        table, mask = self._table, self._mask
        i = digest & mask
        while True:
            held = table[i]
            if held == digest:
                return i
            if held == _EMPTY:
                return -1
            i = (i + 1) & mask

    def _insert(self, digest: int) -> None:
        table, mask = self._table, self._mask
        i = digest & mask
        while table[i] != _EMPTY:
            i = (i + 1) & mask
        table[i] = digest

    def _remove(self, digest: int) -> None:
        """Free `digest`'s cell, shifting back later entries of its run that may move into it
        (no tombstones: a lookup still stops at the first free cell)."""
        table, mask = self._table, self._mask
        hole = self._find(digest)
        j = hole
        while True:
            j = (j + 1) & mask
            held = table[j]
            if held == _EMPTY:
                break
            # `held` may fill the hole when the hole lies between its home cell and j.
            if (j - (held & mask)) & mask >= (j - hole) & mask:
                table[hole] = held
                hole = j
        table[hole] = _EMPTY
