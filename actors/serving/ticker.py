"""A periodic trigger for actors, which have no timers of their own."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Ticker:
    """Call `fire` every `interval` seconds on a daemon thread until stopped."""

    def __init__(self, interval: float, fire: Callable[[], None], name: str) -> None:
        self._interval = interval
        self._fire = fire
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self._fire()
            except Exception:  # the target actor is gone: nothing left to tick
                return
