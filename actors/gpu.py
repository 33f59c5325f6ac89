"""GPUActor: one per device; measures it on a timer and keeps its ledger current."""

from __future__ import annotations

import logging

import pykka

from actors import metrics
from actors.ledger import Ledger
from actors.probes import DeviceProbe

log = logging.getLogger(__name__)


class GPUActor(pykka.ThreadingActor):
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

    def healthy(self) -> bool:
        """True while the last measurement succeeded."""
        return not self._failing
