"""ModelActor: one per loaded model; starts, restarts and stops its worker process.

Requests do not pass through the actor: its ModelLane carries them from the event loop straight
to the worker (see actors/lane.py). The actor hands each fresh worker to the lane, restarts the
worker when the lane reports it dead, and on unload waits for the lane to go idle first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pykka

from actors.errors import (
    MocError,
    ModelLoadFailed,
)
from actors.gpu import wait_for_release
from actors.lane import ModelLane
from actors.probes import DeviceProbe
from actors.resilience import CircuitBreaker
from actors.worker_client import LoadedInfo, WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)


class ModelEvents(Protocol):
    """What the ModelActor tells its manager (a pykka proxy: calls do not block)."""

    def model_loaded(self, name: str, info: LoadedInfo) -> object: ...

    def model_load_failed(self, name: str, error: Exception) -> object: ...

    def model_stopped(self, name: str) -> object: ...

    def model_used(self, name: str) -> object: ...

    def model_memory(self, name: str, mb: float) -> object: ...


WorkerFactory = Callable[[WorkerSpec, Path], WorkerProcess]


def _default_worker(spec: WorkerSpec, runtime_dir: Path) -> WorkerProcess:
    return WorkerProcess(spec, runtime_dir=runtime_dir)


class ModelActor(pykka.ThreadingActor):
    """Supervises one model's worker process."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        runtime_dir: Path,
        events: ModelEvents,
        lane: ModelLane,
        breaker: CircuitBreaker,
        abort: threading.Event | None = None,
        drain_timeout: float = 30.0,
        gpu_probe: DeviceProbe | None = None,
        load_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        worker_factory: WorkerFactory = _default_worker,
    ) -> None:
        super().__init__()
        self.spec = spec
        self._runtime_dir = runtime_dir
        self._events = events
        self._breaker = breaker
        self._abort = abort or threading.Event()
        self._gpu_probe = gpu_probe  # only for NVML devices: wait for the memory to come back
        self._measured_mb = 0.0
        self._load_timeout = load_timeout
        self._clock = clock
        self._worker_factory = worker_factory
        self._worker = worker_factory(spec, runtime_dir)
        self._lane = lane
        self._drain_timeout = drain_timeout
        lane.bind(self.actor_ref.proxy().restart)

    # -- messages -------------------------------------------------------------------------

    def load(self) -> None:
        """Start the worker and load the model; report the outcome to the manager."""
        try:
            info = self._worker.start(timeout=self._load_timeout)
        except Exception as exc:
            error = exc if isinstance(exc, MocError) else ModelLoadFailed(str(exc))
            log.warning("loading %s failed: %s", self.spec.name, error)
            self._events.model_load_failed(self.spec.name, error)
            return
        self._measured_mb = info.measured_mb
        self._lane.attach(self._worker, info.measured_mb)
        self._events.model_loaded(self.spec.name, info)

    def restart(self) -> bool:
        """Give the lane a fresh worker if the current one died; False if none would load."""
        if self._worker.alive:
            return True
        if self._abort.is_set():
            return False
        return self._restart()

    @property
    def worker(self) -> WorkerProcess:
        """The worker process (its `stop`, `alive` and `pid` are safe from any thread)."""
        return self._worker

    # -- lifecycle ------------------------------------------------------------------------

    def on_stop(self) -> None:
        # At shutdown past the node's drain deadline, requests still running are cut off.
        drain = 0.0 if self._abort.is_set() else self._drain_timeout
        if not self._lane.close(drain):
            log.warning("unloading %s with requests still running", self.spec.name)
        self._stop_worker()
        self._events.model_stopped(self.spec.name)

    def _stop_worker(self) -> None:
        """Stop the worker; on a GPU, wait (a few seconds at most) until its memory is back."""
        probe = self._gpu_probe
        before = probe.read().used_mb if probe is not None else 0.0
        self._worker.stop()
        back = probe is None or wait_for_release(probe.read, before, self._measured_mb)
        if not back and probe is not None:
            log.warning("%s: memory of %s not back after 5 s", probe.name, self.spec.name)

    def on_failure(self, *args: object) -> None:
        self._lane.close(0.0)
        self._worker.stop(timeout=1.0)
        self._events.model_stopped(self.spec.name)

    def _restart(self) -> bool:
        """Start a fresh worker after a crash; False (and a breaker failure) if it won't load."""
        self._worker.stop(timeout=1.0)
        self._worker = self._worker_factory(self.spec, self._runtime_dir)
        try:
            info = self._worker.start(timeout=self._load_timeout)
        except Exception as exc:
            self._breaker.record_failure(self._clock())
            log.error("restarting the worker for %s failed: %s", self.spec.name, exc)
            return False
        self._measured_mb = info.measured_mb
        self._lane.attach(self._worker, info.measured_mb)
        self._events.model_loaded(self.spec.name, info)
        return True
