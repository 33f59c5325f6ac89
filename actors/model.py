"""ModelActor: one per loaded model; supervises its worker process and runs its requests.

The actor's mailbox is the model's queue: one sequence decodes at a time, in arrival order. A
crash of the worker fails only the request in flight; the actor restarts the worker behind a
circuit breaker. Results travel back through a `Sink`, never through a future someone blocks on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pykka

from actors import metrics
from actors.errors import (
    Cancelled,
    CircuitOpen,
    MocError,
    ModelLoadFailed,
    ShuttingDown,
    WorkerCrashed,
)
from actors.gpu import wait_for_release
from actors.probes import DeviceProbe
from actors.resilience import CircuitBreaker
from actors.types import InferRequest, InferResult
from actors.worker_client import LoadedInfo, WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Where one request's output goes; implemented by the Node on the event loop's side."""

    def token(self, text: str) -> None:
        """Receive one streamed piece of text."""

    def done(self, result: InferResult) -> None:
        """Receive the final result."""

    def fail(self, error: Exception) -> None:
        """Receive the error that ended the request."""

    def cancelled(self) -> bool:
        """Return True once the client has gone away."""


class ModelEvents(Protocol):
    """What the ModelActor tells its manager (a pykka proxy: calls do not block)."""

    def model_loaded(self, name: str, info: LoadedInfo) -> object: ...

    def model_load_failed(self, name: str, error: Exception) -> object: ...

    def model_stopped(self, name: str) -> object: ...

    def model_used(self, name: str) -> object: ...

    def model_memory(self, name: str, mb: float) -> object: ...


@dataclass(frozen=True, slots=True)
class InferJob:
    """One request handed to the actor; `stream` sends text pieces to the sink as they come."""

    request: InferRequest
    sink: Sink
    stream: bool = False
    deadline: float | None = None  # time.monotonic()


WorkerFactory = Callable[[WorkerSpec, Path], WorkerProcess]


def _default_worker(spec: WorkerSpec, runtime_dir: Path) -> WorkerProcess:
    return WorkerProcess(spec, runtime_dir=runtime_dir)


class ModelActor(pykka.ThreadingActor):
    """Supervises one model's worker process and serves its requests one at a time."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        runtime_dir: Path,
        events: ModelEvents,
        breaker: CircuitBreaker,
        abort: threading.Event | None = None,
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
        self._events.model_loaded(self.spec.name, info)

    def infer(self, job: InferJob) -> None:
        """Run one request through the worker and answer its sink."""
        name = self.spec.name
        if self._abort.is_set():
            job.sink.fail(ShuttingDown("the node is shutting down"))
            return
        if job.sink.cancelled():
            job.sink.fail(Cancelled("the client went away before the request started"))
            return
        now = self._clock()
        if not self._breaker.allow(now):
            job.sink.fail(
                CircuitOpen(
                    f"model {name!r} is failing repeatedly; its circuit breaker is open",
                    retry_after=max(1.0, self._breaker.retry_after(now)),
                )
            )
            return
        if not self._worker.alive and (self._abort.is_set() or not self._restart()):
            job.sink.fail(WorkerCrashed(f"the worker for {name!r} could not be restarted"))
            return
        started = time.perf_counter()
        try:
            result = self._worker.run(
                job.request,
                on_token=job.sink.token if job.stream else None,
                cancelled=lambda: job.sink.cancelled() or self._abort.is_set(),
                deadline=job.deadline,
            )
        except WorkerCrashed as exc:
            self._breaker.record_failure(self._clock())
            metrics.inference_errors_total.labels(name, exc.code).inc()
            log.error("%s; restarting it", exc)
            job.sink.fail(exc)
            if not self._abort.is_set():
                self._restart()
            return
        except MocError as exc:
            metrics.inference_errors_total.labels(name, exc.code).inc()
            job.sink.fail(exc)
            return
        except Exception as exc:  # a bug must fail one request, not the actor
            log.exception("request to %s failed", name)
            metrics.inference_errors_total.labels(name, "internal_error").inc()
            job.sink.fail(exc)
            return
        self._breaker.record_success()
        metrics.inference_latency_seconds.labels(name).observe(time.perf_counter() - started)
        metrics.inference_tokens_generated_total.labels(name).inc(result.tokens_generated)
        self._events.model_used(name)
        self._note_growth()
        job.sink.done(result)

    def _note_growth(self) -> None:
        """Raise the model's claim when its working size grew (buffers allocated on first use)."""
        peak = self._worker.peak_memory_mb
        if peak is not None and peak > self._measured_mb * 1.02:
            self._measured_mb = peak
            self._events.model_memory(self.spec.name, peak)

    @property
    def worker(self) -> WorkerProcess:
        """The worker process (its `stop`, `alive` and `pid` are safe from any thread)."""
        return self._worker

    # -- lifecycle ------------------------------------------------------------------------

    def on_stop(self) -> None:
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
        self._events.model_loaded(self.spec.name, info)
        return True
