"""Lifeguard suspicion timers (memberlist suspicion.go), with time as an argument.

A suspicion starts at `max_s` and shrinks toward `min_s` as independent peers confirm it:
each confirmation is evidence the suspect really is down, so we can declare it sooner.
"""

from __future__ import annotations

import math


def remaining_suspicion_time(n: int, k: int, elapsed_s: float, min_s: float, max_s: float) -> float:
    """Return the seconds left before a suspicion with n of k confirmations fires.

    timeout = max - log(n+1)/log(k+1) * (max - min), floored to the millisecond and never below
    min; the result is that timeout minus `elapsed_s` (negative: already due).
    """
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_s - frac * (max_s - min_s)
    timeout = math.floor(1000.0 * raw) / 1000.0
    timeout = max(timeout, min_s)
    return timeout - elapsed_s


class Suspicion:
    """One suspect's timer: started at `start`, shortened by confirmations from distinct peers."""

    __slots__ = ("confirmations", "deadline", "k", "max_s", "min_s", "n", "start")

    def __init__(self, accuser: str, k: int, min_s: float, max_s: float, start: float) -> None:
        # With too few peers to confirm, use the minimum at once (memberlist: k < 1).
        if k < 1:
            max_s = min_s
        self.k = k
        self.min_s = min_s
        self.max_s = max_s
        self.start = start
        self.n = 0
        # The original accuser does not count as a confirmation.
        self.confirmations: set[str] = {accuser}
        self.deadline = start + max_s

    def confirm(self, accuser: str, now: float) -> bool:
        """Count a confirmation from `accuser`; return whether it was new information."""
        if self.n >= self.k or accuser in self.confirmations:
            return False
        self.confirmations.add(accuser)
        self.n += 1
        remaining = remaining_suspicion_time(
            self.n, self.k, now - self.start, self.min_s, self.max_s
        )
        self.deadline = now + remaining
        return True

    def expired(self, now: float) -> bool:
        """Return whether the suspect should now be declared dead."""
        return now >= self.deadline
