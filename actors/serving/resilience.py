"""Circuit breaker and bulkhead, per model.

The breaker takes the time as an argument so its tests need no clock. The bulkhead is checked
before anything waits: a request past its limits is refused at once, never queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from actors.errors import Overloaded
from actors.serving import metrics
from actors.serving.config import BulkheadConfig, CircuitBreakerConfig
from actors.types import BreakerState

BREAKER_GAUGE = {"closed": 0, "open": 1, "half_open": 2}


class CircuitBreaker:
    """Closed until `failure_threshold` consecutive failures; open for `reset_timeout`; then one
    trial (half-open) decides: success closes it, failure opens it again."""

    def __init__(self, config: CircuitBreakerConfig, name: str = "") -> None:
        self._config = config
        self._name = name
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        # No label children kept: the model's series are removed when its slot is dropped
        # (metrics.forget_model), and a kept child would then write where no scrape looks.
        # Looking them up costs only on a transition or a failure, never on a success.
        self._published: BreakerState | None = None
        self._publish()
        if name:
            metrics.circuit_breaker_failures_total.labels(name)  # exported from 0

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if now - self._opened_at >= self._config.reset_timeout:
            return "half_open"
        return "open"

    def allow(self, now: float) -> bool:
        """Return True if a call may go ahead now (in half-open, only one trial at a time)."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_running:
            self._trial_running = True
            self._publish(now)
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker lets a trial through."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._config.reset_timeout - now)

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_running = False
        self._publish()

    def record_failure(self, now: float) -> None:
        self._failures += 1
        self._trial_running = False
        if self._name:
            metrics.circuit_breaker_failures_total.labels(self._name).inc()
        if self._opened_at is not None or self._failures >= self._config.failure_threshold:
            self._opened_at = now
        self._publish(now)

    def _publish(self, now: float = 0.0) -> None:
        if not self._name:
            return
        state: BreakerState = "open" if self._opened_at is not None else "closed"
        if self._trial_running:
            state = "half_open"
        if state != self._published:  # the gauge moves only on a transition
            self._published = state
            metrics.circuit_breaker_state.labels(self._name).set(BREAKER_GAUGE[state])


class Bulkhead:
    """Bounded admission to one model: `max_concurrent` admitted, `max_queue_size` more waiting.

    Lives on the event loop (the Node admits and releases there); other threads only read the
    counts. Past both limits a request is refused at once with Overloaded.
    """

    def __init__(self, config: BulkheadConfig, name: str) -> None:
        self._config = config
        self._name = name
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self.active = 0
        self.waiting = 0
        # Label children are looked up on each use (about 1.3 us), never kept: this bulkhead
        # outlives a load, and the model's series are removed when it is unloaded
        # (metrics.forget_model); a kept child would then write where no scrape looks.
        self._publish()
        metrics.bulkhead_rejected_total.labels(name)  # exported from 0, as rate() wants

    @property
    def occupancy(self) -> int:
        """Places taken: requests admitted (`active`) plus those waiting for a place."""
        return self.active + self.waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one place for the duration of a request, or raise Overloaded without waiting."""
        capacity = self._config.max_concurrent + self._config.max_queue_size
        if self.occupancy >= capacity:
            metrics.bulkhead_rejected_total.labels(self._name).inc()
            raise Overloaded(
                f"model {self._name!r} is overloaded: {capacity} requests already in flight",
                retry_after=1.0,
            )
        self.waiting += 1
        self._publish()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self._publish()
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            self._publish()

    def _publish(self) -> None:
        metrics.bulkhead_active_requests.labels(self._name).set(self.active)
        metrics.bulkhead_queued_requests.labels(self._name).set(self.waiting)

    def unpublish(self) -> None:
        """Remove this bulkhead's series from the metrics (its name serves no model)."""
        for metric in _BULKHEAD_METRICS:
            with contextlib.suppress(KeyError):  # never published, or removed already
                metric.remove(self._name)


_BULKHEAD_METRICS = (
    metrics.bulkhead_active_requests,
    metrics.bulkhead_queued_requests,
    metrics.bulkhead_rejected_total,
)


class BulkheadRegistry:
    """One bulkhead per model name, created on first use; shared by the Node and the manager."""

    def __init__(self, config: BulkheadConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._bulkheads: dict[str, Bulkhead] = {}

    def get(self, model: str) -> Bulkhead:
        with self._lock:
            bulkhead = self._bulkheads.get(model)
            if bulkhead is None:
                bulkhead = self._bulkheads[model] = Bulkhead(self._config, model)
            return bulkhead

    def __len__(self) -> int:
        return len(self._bulkheads)

    def forget(self, model: str) -> None:
        """Drop `model`'s bulkhead and its series if it is idle.

        Bulkheads are made on first use, before the manager says whether the name is a model:
        without this, every distinct name a client asks for would stay here and on /metrics.
        """
        with self._lock:  # held while unpublishing, so a get() cannot pick up removed series
            bulkhead = self._bulkheads.get(model)
            if bulkhead is None or bulkhead.occupancy:
                return
            del self._bulkheads[model]
            bulkhead.unpublish()

    def occupancy(self, model: str) -> int:
        """Requests admitted or waiting for `model` (0 for a model never asked for)."""
        with self._lock:
            bulkhead = self._bulkheads.get(model)
        return 0 if bulkhead is None else bulkhead.occupancy
