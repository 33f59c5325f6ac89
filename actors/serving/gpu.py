"""GPUActor: one per device; measures it on a timer and keeps its ledger current."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from actors.bridge import LoopReplyActor
from actors.serving import metrics
from actors.serving.ledger import Ledger
from actors.serving.probes import DeviceProbe, DeviceReading

log = logging.getLogger(__name__)


class GPUActor(LoopReplyActor):
    """Owns one device's probe; the ledger it updates is shared with the manager (thread-safe)."""

    def __init__(self, probe: DeviceProbe, ledger: Ledger) -> None:
        super().__init__()
        self.probe = probe
        self.ledger = ledger
        self._failing = False

    def on_start(self) -> None:
        self.poll()

    def poll(self) -> None:
        """Measure the device, update the ledger and the metrics."""
        try:
            reading = self.probe.read()
        except Exception as exc:  # a flaky driver must not kill the actor
            metrics.gpu_probe_errors_total.labels(self.ledger.name).inc()
            if not self._failing:
                log.warning("measuring %s failed: %s", self.ledger.name, exc)
            self._failing = True
            return
        self._failing = False
        self.ledger.update(reading)
        self.publish()

    def publish(self) -> None:
        """Export the ledger's current view as metrics."""
        info = self.ledger.info()
        labels = (info.label, info.kind)
        metrics.gpu_total_memory_mb.labels(*labels).set(info.total_mb)
        metrics.gpu_used_memory_mb.labels(*labels).set(info.used_mb)
        metrics.gpu_claimed_memory_mb.labels(*labels).set(info.claimed_mb)
        if info.utilization_percent is not None:
            metrics.gpu_utilization_percent.labels(*labels).set(info.utilization_percent)
        if info.temperature_c is not None:
            metrics.gpu_temperature_celsius.labels(*labels).set(info.temperature_c)

    def ping(self) -> bool:
        """Answer True: the watchdog's proof that this actor still takes messages."""
        return True

    def healthy(self) -> bool:
        """True while the last measurement succeeded."""
        return not self._failing


_NEVER_SET = threading.Event()  # its wait() is a pause that a test can replace


def wait_for_release(
    read: Callable[[], DeviceReading],
    used_before_mb: float,
    released_mb: float,
    *,
    timeout: float = 5.0,
    interval: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], object] = _NEVER_SET.wait,
) -> bool:
    """Poll the device until most of a stopped model's memory is back; False on timeout.

    GPU drivers free memory some time after the process exits. Like Ollama, count the memory as
    back once 75% of it shows as free, and give up after a few seconds rather than hang a load.
    """
    deadline = clock() + timeout
    while True:
        if used_before_mb - read().used_mb >= 0.75 * released_mb:
            return True
        if clock() >= deadline:
            return False
        pause(interval)
