"""ModelActor: one per loaded model; starts, restarts and stops its worker process.

Requests do not pass through the actor: its ModelLane carries them from the event loop straight
to the worker (see actors/serving/lane.py). The actor hands each fresh worker to the lane, restarts the
worker when the lane reports it dead, and on unload waits for the lane to go idle first.

Between requests it also measures the worker every `MemoryWatch.poll_s` (actors/serving/memory_watch.py):
growth is reported to the manager, which raises the model's claim in the ledger, and a worker
past the per-worker memory limit is killed; its requests fail naming the limit, and the lane's
breaker and restart take it from there as for any crash.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from actors.bridge import LoopReplyActor
from actors.errors import (
    MocError,
    ModelLoadFailed,
)
from actors.serving.gpu import wait_for_release
from actors.serving.lane import ModelLane
from actors.serving.memory_watch import MemoryWatch, judge_memory
from actors.serving.metrics import worker_memory_kills_total
from actors.serving.probes import DeviceProbe, process_rss_mb
from actors.serving.resilience import CircuitBreaker
from actors.serving.ticker import Ticker
from actors.worker.client import WorkerProcess
from actors.worker.handle import WorkerFactory, WorkerHandle, WorkerSpec
from actors.worker.protocol import Loaded

log = logging.getLogger(__name__)


ProcessMemory = Callable[[int], float | None]
"""The memory process `pid` holds on the model's device in MiB (None: it cannot be told)."""


class ModelEvents(Protocol):
    """What the ModelActor tells its manager (a pykka proxy: calls do not block)."""

    def model_loaded(self, name: str, info: Loaded) -> object: ...

    def model_load_failed(self, name: str, error: Exception) -> object: ...

    def model_stopped(self, name: str) -> object: ...

    def model_memory(self, name: str, mb: float) -> object: ...


def worker_process(spec: WorkerSpec, runtime_dir: Path) -> WorkerHandle:
    """Make the real worker: a child process (the production `WorkerFactory`)."""
    return WorkerProcess(spec, runtime_dir=runtime_dir)


class ModelActor(LoopReplyActor):
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
        worker_factory: WorkerFactory = worker_process,
        memory_watch: MemoryWatch | None = None,
        process_memory: ProcessMemory | None = None,
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
        self._watch = memory_watch or MemoryWatch()
        # On a GPU the process's share of the device as NVML tells it, else its RSS.
        nvml_share = getattr(gpu_probe, "process_memory_mb", None)
        self._process_memory: ProcessMemory = process_memory or nvml_share or process_rss_mb
        self._offset_mb = 0.0  # what the worker process holds beyond the model
        self._reported_mb = 0.0  # the model's size last reported to the manager
        self._check_queued = threading.Event()
        self._ticker: Ticker | None = None
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
        self._attach(info)
        self._events.model_loaded(self.spec.name, info)

    def restart(self) -> bool:
        """Give the lane a fresh worker if the current one died; False if none would load."""
        if self._worker.alive:
            return True
        if self._abort.is_set():
            return False
        return self._restart()

    def set_threads(self, n_threads: int) -> None:
        """Compute with `n_threads` from now on; a restarted worker starts with them too."""
        load = dataclasses.replace(self.spec.load, n_threads=n_threads)
        self.spec = dataclasses.replace(self.spec, load=load)
        self._worker.set_threads(n_threads)

    @property
    def worker(self) -> WorkerHandle:
        """The worker (its `stop`, `alive` and `pid` are safe from any thread)."""
        return self._worker

    # -- lifecycle ------------------------------------------------------------------------

    def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
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
        if self._ticker is not None:
            self._ticker.stop()
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
        self._attach(info)
        self._events.model_loaded(self.spec.name, info)
        return True

    def _attach(self, info: Loaded) -> None:
        """Serve through the freshly loaded worker; note what its process holds besides."""
        self._measured_mb = self._reported_mb = info.measured_mb
        held = self._process_memory(info.pid)
        self._offset_mb = 0.0 if held is None else max(0.0, held - info.measured_mb)
        self._lane.attach(self._worker, info.measured_mb)

    # -- memory watch ---------------------------------------------------------------------

    def on_start(self) -> None:
        self._ticker = Ticker(self._watch.poll_s, self._tick, f"memory-{self.spec.name}").start()

    def _tick(self) -> None:
        """On the ticker's thread: queue a check unless one is still waiting (a long load)."""
        if not self._check_queued.is_set():
            self._check_queued.set()
            self.actor_ref.tell(_CheckMemory())

    def on_receive(self, message: object) -> object:
        if isinstance(message, _CheckMemory):
            self._check_queued.clear()
            self.check_memory()
            return None
        return super().on_receive(message)

    def check_memory(self) -> None:
        """Measure the worker: report growth to the manager, kill it past the memory limit."""
        worker = self._worker
        pid = worker.pid
        held = self._process_memory(pid) if pid is not None and worker.alive else None
        if held is None:
            return
        verdict = judge_memory(held, self._offset_mb, self._reported_mb, self._watch.limit_mb)
        if verdict.kill:
            reason = (
                f"the worker for {self.spec.name!r} was killed: it held {held:.0f} MiB, over the "
                f"per-worker memory limit of {self._watch.limit_mb:.0f} MiB "
                "([resources] worker_memory_limit_mb)"
            )
            log.error("%s", reason)
            worker_memory_kills_total.labels(self.spec.name).inc()
            self._lane.note_killed(worker, reason)  # before the kill: its requests fail with it
            worker.kill()
        elif verdict.grown_mb is not None:
            self._reported_mb = verdict.grown_mb
            self._events.model_memory(self.spec.name, verdict.grown_mb)


class _CheckMemory:
    """The ticker's message: measure the worker now."""
