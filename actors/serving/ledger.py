"""The memory ledger of one device: what models claim versus what the probe measures.

Free memory is the smaller of what the device says is free and what the claims leave, because a
device reports memory late after a load (Ollama's `updateFreeSpace` does the same).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from actors.serving.probes import DeviceReading
from actors.types import DeviceInfo, DeviceKind


@dataclass(frozen=True, slots=True)
class Budget:
    """How much of a device models may claim, in MiB."""

    reserve_mb: float = 512.0
    threshold_pct: float = 90.0
    soft_limit_mb: float = 0.0


def headroom_mb(reading: DeviceReading, claimed_mb: float, budget: Budget) -> float:
    """Return the MiB a new claim may take: the tightest of measurement, claims, threshold, cap."""
    limits = [
        reading.free_mb - budget.reserve_mb,
        reading.total_mb - claimed_mb - budget.reserve_mb,
        reading.total_mb * budget.threshold_pct / 100.0 - claimed_mb,
    ]
    if budget.soft_limit_mb > 0:
        limits.append(budget.soft_limit_mb - claimed_mb)
    return max(0.0, min(limits))


@dataclass
class Ledger:
    """Claims per model on one device plus its latest reading; safe to use from any thread."""

    name: str
    kind: DeviceKind
    budget: Budget
    reading: DeviceReading
    _claims: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, model: str, mb: float) -> None:
        """Record (or replace) the claim of `model`."""
        with self._lock:
            self._claims[model] = float(mb)

    def release(self, model: str) -> None:
        """Drop the claim of `model`, if any."""
        with self._lock:
            self._claims.pop(model, None)

    def update(self, reading: DeviceReading) -> None:
        """Store a fresh measurement."""
        with self._lock:
            self.reading = reading

    def claims(self) -> dict[str, float]:
        with self._lock:
            return dict(self._claims)

    def headroom_mb(self) -> float:
        """MiB a new claim may take now."""
        with self._lock:
            return headroom_mb(self.reading, sum(self._claims.values()), self.budget)

    def info(self) -> DeviceInfo:
        """Snapshot for listings and metrics."""
        with self._lock:
            claimed = sum(self._claims.values())
            reading = self.reading
        free = min(reading.free_mb, reading.total_mb - claimed - self.budget.reserve_mb)
        return DeviceInfo(
            name=self.name,
            kind=self.kind,
            total_mb=round(reading.total_mb, 1),
            used_mb=round(reading.used_mb, 1),
            claimed_mb=round(claimed, 1),
            free_mb=round(max(0.0, free), 1),
            utilization_percent=reading.utilization_percent,
            temperature_c=reading.temperature_c,
        )
