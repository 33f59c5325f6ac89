"""A fake worker for serving's tests: the worker room's `WorkerHandle` with no process.

`FakeWorkers` is the `WorkerFactory` the manager or ModelActor is handed; it makes one
`FakeWorker` a start and keeps them all, so a test can crash one or count the starts. Requests
through a `FakeChannel` answer at once, or wait while `workers.hold` is set; a worker that is
stopped, killed or crashed fails every request waiting on it with WorkerCrashed, as a real
worker's channel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncGenerator
from pathlib import Path

from actors.errors import ModelLoadFailed, WorkerCrashed
from actors.types import InferRequest, InferResult
from actors.worker.handle import RequestChannel, WorkerSpec
from actors.worker.protocol import Loaded


class FakeChannel:
    """Requests to one fake worker, on the event loop that opened it."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.closed: WorkerCrashed | None = None
        self._loop = asyncio.get_running_loop()
        self._death: asyncio.Future[WorkerCrashed] = self._loop.create_future()

    async def infer(self, req: InferRequest, deadline: float | None = None) -> InferResult:
        await self._wait_for_release()
        self.worker.served += 1
        if self.worker.workers.peak_after_request is not None:
            self.worker.peak_memory_mb = self.worker.workers.peak_after_request
        return InferResult(
            text="ok",
            tokens_generated=req.params.max_tokens,
            prompt_tokens=1,
            finish_reason="length",
            latency_ms=1.0,
            model_version=self.worker.version,
            prompt_tokens_reused=self.worker.workers.prompt_tokens_reused,
            first_token_ms=self.worker.workers.first_token_ms,
        )

    async def stream(
        self, req: InferRequest, deadline: float | None = None
    ) -> AsyncGenerator[str | InferResult, None]:
        yield "o"
        yield await self.infer(req, deadline)

    def close(self) -> None:
        self._fail(WorkerCrashed("the channel was closed"))

    def die(self, reason: WorkerCrashed) -> None:
        """Fail what waits here (from any thread): the worker is gone."""
        with contextlib.suppress(RuntimeError):  # the test's loop is closed: nothing waits
            self._loop.call_soon_threadsafe(self._fail, reason)

    def _fail(self, reason: WorkerCrashed) -> None:
        if self.closed is None:
            self.closed = reason
        if not self._death.done():
            self._death.set_result(reason)

    async def _wait_for_release(self) -> None:
        if self.closed is not None:
            raise self.closed
        hold = self.worker.workers.hold
        if hold.is_set():
            released = self._loop.create_future()
            self.worker.workers.waiting.append((self._loop, released))
            await asyncio.wait({released, self._death}, return_when=asyncio.FIRST_COMPLETED)
        if self._death.done():
            raise self._death.result()


class FakeWorker:
    """One fake worker process: `start` loads at once (or fails as its factory says)."""

    def __init__(self, spec: WorkerSpec, workers: FakeWorkers) -> None:
        self.spec = spec
        self.workers = workers
        self.version = f"{spec.name}-v1"
        self.peak_memory_mb: float | None = None
        self.served = 0
        self.stopped = False
        self.threads: list[int] = []  # what set_threads was told, in order
        self._pid: int | None = None
        self._alive = False
        self._channels: list[FakeChannel] = []
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return self._alive

    def start(self, timeout: float = 300.0) -> Loaded:
        if self.spec.name in self.workers.failing:
            raise ModelLoadFailed(f"{self.spec.name} will not load: the test says so")
        self._pid = next(self.workers.pids)
        self._alive = True
        self.peak_memory_mb = self.workers.measured_mb
        return Loaded(
            pid=self._pid,
            measured_mb=self.workers.measured_mb,
            load_seconds=0.5,
            version=self.version,
            n_ctx=self.spec.load.n_ctx,
        )

    def open_channel(self) -> RequestChannel:
        channel = FakeChannel(self)
        with self._lock:
            self._channels.append(channel)
            alive = self._alive
        if not alive:
            channel.die(WorkerCrashed(f"cannot reach the worker for {self.spec.name}"))
        return channel

    def stop(self, timeout: float = 10.0) -> None:
        self.stopped = True
        self._die("stopped")

    def set_threads(self, n_threads: int) -> bool:
        if not self._alive:
            return False
        self.threads.append(n_threads)
        return True

    def kill(self) -> None:
        self._die("died (signal 9)")

    def crash(self) -> None:
        """Die as a native crash would: every request on it fails."""
        self._die("died (signal 11)")

    def _die(self, how: str) -> None:
        with self._lock:
            self._alive = False
            channels = list(self._channels)
        for channel in channels:
            channel.die(WorkerCrashed(f"the worker for {self.spec.name!r} {how}"))


class FakeWorkers:
    """The `WorkerFactory` of the tests: makes `FakeWorker`s and remembers them in order."""

    def __init__(self, measured_mb: float = 100.0) -> None:
        self.measured_mb = measured_mb
        self.made: list[FakeWorker] = []
        self.failing: set[str] = set()  # model names whose loads fail
        self.peak_after_request: float | None = None  # a worker's memory after a request
        self.first_token_ms: float | None = None  # what each result reports
        self.prompt_tokens_reused = 0
        self.hold = threading.Event()  # set: requests wait until `release()`
        self.waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.pids = itertools.count(1000)

    def __call__(self, spec: WorkerSpec, runtime_dir: Path) -> FakeWorker:
        worker = FakeWorker(spec, self)
        self.made.append(worker)
        return worker

    def of(self, name: str) -> list[FakeWorker]:
        """Return the workers made for model `name`, oldest first."""
        return [w for w in self.made if w.spec.name == name]

    def release(self) -> None:
        """Let every held request go on, and stop holding new ones."""
        self.hold.clear()
        waiting, self.waiting = self.waiting, []
        for loop, released in waiting:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing waits
                loop.call_soon_threadsafe(_settle, released)


def _settle(released: asyncio.Future[None]) -> None:
    if not released.done():  # a request cancelled meanwhile
        released.set_result(None)
