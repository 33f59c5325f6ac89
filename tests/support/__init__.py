"""What many tests need, written once: waiting on a condition with a deadline, a fake clock.

Tests never sleep to synchronise: they wait for the condition they need, and fail with what
they were waiting for when it does not come. Timer maths is tested with `FakeClock`, which
moves only when told (trio's MockClock.jump).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

POLL_S = 0.01
"""How often a condition is checked: short next to any test's work, long next to the check."""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
    """Return once `predicate()` holds; fail after `timeout` seconds, saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: a wait that no signal handler can cut short
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        pause.wait(POLL_S)


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
    """The event-loop form of `wait_until`: the loop keeps running while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(POLL_S)


class FakeClock:
    """Monotonic seconds that move only when a test says so; call it to read the time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock forward (never back) and return the new time."""
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
        return self.now
