"""ModelBoard: the latest ModelInfo and lane of every model, for any thread to read at once.

The manager owns each model's state on its own thread (its `Slot`); the board is the copy it
publishes after every change, so the event loop finds a loaded model's lane, and listings and
health read every model, without asking the manager and waiting for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from actors.serving.lane import ModelLane
from actors.serving.resilience import CircuitBreaker
from actors.types import ModelInfo


def _by_name(info: ModelInfo) -> str:
    return info.name


def _with_breaker(info: ModelInfo, breaker: CircuitBreaker | None, now: float) -> ModelInfo:
    """Return `info` with its breaker's state now, copied only when that state changed
    (health and list_models read every model on each call)."""
    if breaker is None:
        return info
    state = breaker.state(now)
    return info if state == info.breaker else replace(info, breaker=state)


class ModelBoard:
    """The latest ModelInfo per model, written by the manager, read by anyone without blocking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelInfo] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lanes: dict[str, ModelLane] = {}
        self.changed = threading.Condition(self._lock)

    def put(
        self,
        info: ModelInfo,
        breaker: CircuitBreaker | None,
        lane: ModelLane | None = None,
    ) -> None:
        """Publish a model's state; its lane is served only while it is loaded."""
        with self._lock:
            self._models[info.name] = info
            if breaker is not None:
                self._breakers[info.name] = breaker
            if info.state == "loaded" and lane is not None:
                self._lanes[info.name] = lane
            else:
                self._lanes.pop(info.name, None)
            self.changed.notify_all()

    def remove(self, name: str) -> None:
        """Forget a model the manager dropped."""
        with self._lock:
            self._models.pop(name, None)
            self._breakers.pop(name, None)
            self._lanes.pop(name, None)
            self.changed.notify_all()

    def lane(self, name: str) -> ModelLane | None:
        """Return a loaded model's lane: requests to it need not ask the manager."""
        return self._lanes.get(name)  # one dict read: atomic, and this is the hot path

    def snapshot(self, now: float) -> list[ModelInfo]:
        """Return every model by name, each with its breaker's state at `now`."""
        with self._lock:
            models = list(self._models.values())
            breakers = dict(self._breakers)
        return [_with_breaker(m, breakers.get(m.name), now) for m in sorted(models, key=_by_name)]

    def get(self, name: str) -> ModelInfo | None:
        """Return a model's latest published state, if the manager knows it."""
        with self._lock:
            return self._models.get(name)

    def wait_until(self, predicate: Callable[[list[ModelInfo]], bool], timeout: float) -> bool:
        """Block until `predicate(models)` holds or `timeout` passes (for shutdown and tests)."""
        with self._lock:
            return self.changed.wait_for(lambda: predicate(list(self._models.values())), timeout)


__all__ = ["ModelBoard"]
