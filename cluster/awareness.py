"""Lifeguard's local health score (memberlist awareness.go).

The score counts recent evidence that *this* node is slow or cut off: failed probes with
missing nacks, having to refute a suspicion. It stretches the probe interval so a sick node
accuses its healthy peers less.
"""

from __future__ import annotations


class Awareness:
    """A health score in 0..max_multiplier-1; 0 is healthy."""

    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> int:
        """Add `delta`, clamp to the range, and return the new score."""
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)
        return self.score

    def scale(self, timeout_s: float) -> float:
        """Return `timeout_s` stretched by (score + 1)."""
        return timeout_s * (self.score + 1)
