"""Many keys due at a delay, one loop timer: the peer RPC's ack and reply deadlines."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Keys due at a delay from now; `expire(key)` is called for each once it is due.

    One loop timer at a time, armed only when no earlier one is: a timer per request
    (`call_later`) is nearly always cancelled unused, the answer coming long before, yet costs
    ~40 us with cold caches (the first request after a quiet spell). Here a request costs a
    dict entry.
    """

    def __init__(self, expire: Callable[[K], None]) -> None:
        self._expire = expire
        self._due: dict[K, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: K, delay: float) -> None:
        """Make `key` due `delay` seconds from now (on the running loop's clock)."""
        loop = asyncio.get_running_loop()
        when = self._due[key] = loop.time() + delay
        if when < self._timer_at or self._timer_loop is not loop:
            self._arm(loop, when)  # (a timer armed in another loop would never fire here)

    def discard(self, key: K) -> None:
        """Forget `key`, due or not."""
        self._due.pop(key, None)

    def close(self) -> None:
        """Forget every key and the timer."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._due.clear()

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._fire, loop), when
        self._timer_loop = loop

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now = loop.time()
        for key in [k for k, when in self._due.items() if when <= now]:
            del self._due[key]
            try:
                self._expire(key)
            except Exception:  # one failure must not strand the keys due after it
                log.exception("a peer RPC deadline could not be handled")
        if self._due:
            self._arm(loop, min(self._due.values()))

