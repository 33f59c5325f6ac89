"""ModelLane: how the event loop serves one loaded model, straight to its worker process.

The ModelActor owns the worker's life (start, restart, stop) on its thread; the lane carries the
requests on the event loop: no thread hop per request, several requests in flight (the worker
queues them), a circuit breaker in front, and the per-request metrics. When the worker dies the
lane fails what was in flight and asks the actor for a fresh worker; the actor waits for the
lane to go idle before it stops a worker on unload.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

import pykka

from actors.bridge import ask
from actors.errors import CircuitOpen, MocError, ModelNotLoaded, ShuttingDown, WorkerCrashed
from actors.serving import metrics
from actors.serving.resilience import CircuitBreaker
from actors.types import EmbedRequest, EmbedResult, InferRequest, InferResult
from actors.worker.handle import RequestChannel, WorkerHandle

log = logging.getLogger(__name__)

_USED_EVERY_S = 0.5  # how often, at most, the manager hears that a busy model was used


T = TypeVar("T")


class LaneEvents(Protocol):
    """What the lane tells the manager (a pykka proxy: calls do not block)."""

    def model_used(self, name: str) -> object: ...

    def model_memory(self, name: str, mb: float) -> object: ...


Restart = Callable[[], pykka.Future[bool]]
"""The ModelActor's `restart` through its proxy: a future of whether a worker runs now."""


class LaneClosed(ModelNotLoaded):
    """The model is being unloaded: ask the manager again (it may load it anew)."""


class ModelLane:
    """One loaded model's request path on the event loop."""

    def __init__(
        self,
        name: str,
        *,
        events: LaneEvents,
        breaker: CircuitBreaker,
        abort: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        slots: int = 1,
    ) -> None:
        self.name = name
        self.slots = slots  # requests the worker decodes at once; more wait in its queue
        self._events = events
        self._breaker = breaker
        self._abort = abort or threading.Event()
        self._clock = clock
        self._restart: Restart | None = None
        self._worker: WorkerHandle | None = None
        self._measured_mb = 0.0
        self._channel: RequestChannel | None = None
        self._channel_worker: WorkerHandle | None = None  # the worker `_channel` reaches
        self._death_counted: WorkerHandle | None = None  # a worker whose death the breaker saw
        self._killed: tuple[WorkerHandle, str] | None = None  # a worker the actor killed, why
        self._closed = False
        self._running = 0  # requests past the breaker, until they end
        self._idle = threading.Condition()
        self._used_told = float("-inf")
        self._latency = metrics.inference_latency_seconds.labels(name)
        self._tokens = metrics.inference_tokens_generated_total.labels(name)
        self._ttft = metrics.inference_time_to_first_token_seconds.labels(name)
        self._tpot = metrics.inference_time_per_output_token_seconds.labels(name)
        self._prompt_tokens = metrics.inference_prompt_tokens_total.labels(name)
        self._reused_tokens = metrics.inference_prompt_tokens_reused_total.labels(name)
        self._slots_busy = metrics.model_slots_busy.labels(name)
        self._queue_depth = metrics.model_queue_depth.labels(name)
        metrics.model_slots.labels(name).set(slots)

    # -- the actor's side (any thread) ------------------------------------------------------

    def bind(self, restart: Restart) -> None:
        """Name the actor call that restarts the worker (returns a pykka future of a bool)."""
        self._restart = restart

    def attach(self, worker: WorkerHandle, measured_mb: float) -> None:
        """Serve through this freshly started worker from now on."""
        self._measured_mb = measured_mb
        self._worker = worker

    def note_killed(self, worker: WorkerHandle, reason: str) -> None:
        """Say why the actor is killing `worker`: its requests fail with `reason`, not with a
        bare "died (signal 9)"."""
        self._killed = (worker, reason)

    def close(self, timeout: float) -> bool:
        """Take no new requests; wait up to `timeout` for those in flight. False if some remain."""
        self._closed = True
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    @property
    def closing(self) -> bool:
        """True once the model is being unloaded: ask the manager for it again."""
        return self._closed

    # -- the event loop's side ----------------------------------------------------------------

    async def infer(self, req: InferRequest, deadline: float | None = None) -> InferResult:
        """Run one whole request through the worker."""
        result = await self._through_worker(lambda channel: channel.infer(req, deadline))
        self._succeeded(result)
        return result

    async def stream(
        self, req: InferRequest, deadline: float | None = None
    ) -> AsyncGenerator[str | InferResult, None]:
        """Yield the request's text piece by piece, then its result."""
        channel, worker = await self._enter()
        with self._leaving(channel, worker):
            async for item in channel.stream(req, deadline):
                if isinstance(item, InferResult):
                    self._succeeded(item)
                yield item

    async def embed(self, req: EmbedRequest, deadline: float | None = None) -> EmbedResult:
        """Embed the request's inputs through the worker, counted like any request."""
        result = await self._through_worker(lambda channel: channel.embed(req, deadline))
        self._prompt_tokens.inc(result.prompt_tokens)
        self._served()
        return result

    async def _through_worker(self, call: Callable[[RequestChannel], Awaitable[T]]) -> T:
        """Make one call on a live worker's channel; a failure is counted and, when the worker
        died, raised as its reason."""
        channel, worker = await self._enter()
        with self._leaving(channel, worker):
            return await call(channel)
        raise AssertionError("unreachable: _leaving re-raises what it catches")

    @contextlib.contextmanager
    def _leaving(self, channel: RequestChannel, worker: WorkerHandle) -> Iterator[None]:
        """Leave the lane when the request ends; a failure is counted and, when the worker
        died, raised as its reason."""
        try:
            yield
        except Exception as exc:
            explained = self._count_failure(exc, channel, worker)
            if explained is exc:
                raise
            raise explained from exc
        finally:
            self._leave()

    def _count_failure(
        self, exc: Exception, channel: RequestChannel, worker: WorkerHandle
    ) -> Exception:
        """Count a failed request; return what to raise: the worker's reason when it died."""
        explained = self._explained(exc, worker)
        self._failed(explained, channel, worker)
        return explained

    async def _enter(self) -> tuple[RequestChannel, WorkerHandle]:
        if self._abort.is_set():
            raise ShuttingDown("the node is shutting down")
        if self._closed:
            raise LaneClosed(f"model {self.name!r} is being unloaded")
        now = self._clock()
        if not self._breaker.allow(now):
            raise CircuitOpen(
                f"model {self.name!r} is failing repeatedly; its circuit breaker is open",
                retry_after=max(1.0, self._breaker.retry_after(now)),
            )
        with self._idle:
            self._running += 1
            self._show_occupancy()
        try:
            return await self._ready_channel()
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        with self._idle:
            self._running -= 1
            self._show_occupancy()
            if self._running == 0:
                self._idle.notify_all()

    def _show_occupancy(self) -> None:
        """Set the slot gauges from the requests past the breaker (under `_idle`)."""
        self._slots_busy.set(min(self._running, self.slots))
        self._queue_depth.set(max(0, self._running - self.slots))

    async def _ready_channel(self) -> tuple[RequestChannel, WorkerHandle]:
        """Return a channel to a live worker (and that worker), asking the actor for a new
        worker if it died."""
        channel = self._channel
        worker = self._worker
        if channel is not None and self._channel_worker is worker and channel.closed is None:
            assert worker is not None
            return channel, worker
        if channel is not None:
            channel.close()
            self._channel = self._channel_worker = None
        if worker is None or not worker.alive:
            if self._closed:
                raise LaneClosed(f"model {self.name!r} is being unloaded")
            await self._restart_worker()
            worker = self._worker
            assert worker is not None
        self._channel, self._channel_worker = worker.open_channel(), worker
        return self._channel, worker

    async def _restart_worker(self) -> None:
        if self._restart is None or self._abort.is_set():
            raise WorkerCrashed(f"the worker for {self.name!r} is not running")
        try:
            restarted = await ask(self._restart())
        except pykka.ActorDeadError:
            raise LaneClosed(f"model {self.name!r} is being unloaded") from None
        if not restarted or self._worker is None or not self._worker.alive:
            raise WorkerCrashed(f"the worker for {self.name!r} could not be restarted")

    def _succeeded(self, result: InferResult) -> None:
        self._latency.observe(result.latency_ms / 1000.0)
        self._tokens.inc(result.tokens_generated)
        self._prompt_tokens.inc(result.prompt_tokens)
        self._reused_tokens.inc(result.prompt_tokens_reused)
        if result.first_token_ms is not None:
            self._ttft.observe(result.first_token_ms / 1000.0)
            if result.tokens_generated > 1:
                decoding_ms = max(0.0, result.latency_ms - result.first_token_ms)
                self._tpot.observe(decoding_ms / 1000.0 / (result.tokens_generated - 1))
        self._served()

    def _served(self) -> None:
        """What every successful request tells: the breaker, the manager (used), the claim."""
        self._breaker.record_success()
        now = self._clock()
        if now - self._used_told >= _USED_EVERY_S:
            self._used_told = now
            self._events.model_used(self.name)
        self._note_growth()

    def _explained(self, exc: Exception, worker: WorkerHandle) -> Exception:
        """Return the crash of a worker the actor killed as the reason it was killed."""
        killed = self._killed
        if isinstance(exc, WorkerCrashed) and killed is not None and killed[0] is worker:
            return WorkerCrashed(killed[1])
        return exc

    def _failed(self, exc: Exception, channel: RequestChannel, worker: WorkerHandle) -> None:
        if isinstance(exc, WorkerCrashed):
            metrics.inference_errors_total.labels(self.name, exc.code).inc()
            # One death fails every request in flight at once: it counts as one failure.
            if channel.closed is not None:
                if self._death_counted is worker:
                    return
                self._death_counted = worker
            self._breaker.record_failure(self._clock())
            if channel.closed is not None and self._may_restart():
                log.error("%s; restarting it", exc)
                assert self._restart is not None
                self._restart()  # in the background: the next request finds a fresh worker
        elif isinstance(exc, MocError):
            metrics.inference_errors_total.labels(self.name, exc.code).inc()
        else:  # a bug must fail one request, not the model
            log.error("request to %s failed", self.name, exc_info=exc)
            metrics.inference_errors_total.labels(self.name, "internal_error").inc()

    def _may_restart(self) -> bool:
        return not self._abort.is_set() and not self._closed and self._restart is not None

    def _note_growth(self) -> None:
        """Raise the model's claim when its working size grew (buffers allocated on first use)."""
        worker = self._worker
        peak = worker.peak_memory_mb if worker is not None else None
        if peak is not None and peak > self._measured_mb * 1.02:
            self._measured_mb = peak
            self._events.model_memory(self.name, peak)
