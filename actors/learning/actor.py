"""The LearningActor: accepts job specs, queues them, runs up to `max_parallel_jobs` at once.

Each running job trains in its own thread of the node process, not a child process: torch
releases the GIL inside its kernels, so threads train in parallel; a job starts at once (no
interpreter and torch import per job, ~2 s); progress, checkpoints and cancels need no IPC; and
the job store is already shared. The price is isolation: a crash inside torch's native code
would take the node down, which we accept because torch on the CPU is not the native code that
crashes (llama.cpp, which does, runs in worker processes). Cancel is cooperative and takes
effect before the next optimizer step, i.e. within one step.

Memory: before a job starts it claims its estimated peak memory through `claim(job_id, mb)`
(the node maps it onto the device ledger, so a serving model is never pushed out or OOMed by
training); a refused claim leaves the job queued and retried every `retry_interval_s`, and after
`memory_wait_s` it fails with a clear error. The queue is strict: a job that waits for memory
holds back the lower-priority jobs behind it, so a large urgent job is not starved.

The actor itself never blocks: job threads report back with messages (`_job_ended`), and a
ticker thread sends `_tick` to retry waiting claims.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pykka

from actors.errors import MocError, ModelNotFound
from actors.learning import metrics
from actors.learning.config import LearningConfig
from actors.learning.datasets import load_dataset
from actors.learning.errors import (
    InvalidJobSpec,
    JobMemoryUnavailable,
    JobNotFound,
    UnsupportedModel,
)
from actors.learning.gguf_io import read_params
from actors.learning.jobs import FINAL, JobStore, queue_order
from actors.learning.spec import parse_spec

if TYPE_CHECKING:
    from actors.learning.runner import JobResult

log = logging.getLogger(__name__)

Claim = Callable[[str, float], bool]
Release = Callable[[str], None]
ResolveModel = Callable[[str], Path]
Register = Callable[[str, Path, "str | None"], None]
OnProgress = Callable[[dict[str, Any]], None]


@dataclass
class _Running:
    thread: threading.Thread
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0


def _model_params(path: Path) -> Any:
    import gguf

    try:
        return read_params(gguf.GGUFReader(str(path)))
    except (OSError, ValueError) as exc:
        raise UnsupportedModel(f"cannot read GGUF {path}: {exc}") from exc


class LearningActor(pykka.ThreadingActor):
    """Schedules and runs learning jobs; every method is called through the actor's proxy."""

    def __init__(
        self,
        config: LearningConfig,
        *,
        claim: Claim,
        release: Release,
        resolve_model: ResolveModel,
        register: Register,
        on_progress: OnProgress | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.config = config
        self._claim = claim
        self._release = release
        self._resolve = resolve_model
        self._register = register
        self._on_progress = on_progress
        self._clock = clock
        self._store = JobStore(config.job_store)
        self._running: dict[str, _Running] = {}
        self._waiting_since: dict[str, float] = {}
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def on_start(self) -> None:
        """Requeue jobs a crash interrupted, start the ticker, start what can run."""
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        resumed = self._store.recover(self._clock())
        if resumed:
            log.info("resuming %d interrupted learning job(s): %s", len(resumed), resumed)
        proxy = self.actor_ref.proxy()

        def tick() -> None:
            while not self._stopping.wait(self.config.retry_interval_s):
                try:
                    proxy.tick()
                except pykka.ActorDeadError:
                    return

        self._ticker = threading.Thread(target=tick, name="learning-ticker", daemon=True)
        self._ticker.start()
        self._schedule()

    def on_stop(self) -> None:
        """Stop running jobs (they resume after a restart) and close the store."""
        self.stop_all()
        self._store.close()

    def stop_all(self, timeout: float = 30.0) -> None:
        """Stop every running job and wait for their threads; they stay queued for a restart."""
        self._stopping.set()
        for run in self._running.values():
            run.cancel.set()  # observed as "stop", since self._stopping is set
        deadline = time.monotonic() + timeout
        for job_id, run in list(self._running.items()):
            run.thread.join(max(0.0, deadline - time.monotonic()))
            self._store.set_status(job_id, "queued", self._clock(), only_from=("running",))
            self._release_claim(job_id)
        self._running.clear()

    # -- the API ------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> str:
        """Check a job spec and its dataset, queue the job and return its id."""
        if self._stopping.is_set():
            raise InvalidJobSpec("spec", "the learning actor is stopping")
        job = parse_spec(
            spec, default_steps=self.config.default_steps, max_steps=self.config.max_steps
        )
        load_dataset(job.dataset_path, job.job_type, self.config.dataset_dirs)
        base = self._resolve_checked("model_name", job.model_name)
        teacher = None
        if job.params.teacher is not None:
            teacher = _model_params(
                self._resolve_checked("training_params.teacher", job.params.teacher)
            )
        params = _model_params(base)
        from actors.learning.trainers import estimate_memory_mb  # torch: imported on first use

        memory = estimate_memory_mb(params, job.job_type, job.params, teacher)
        job_id = uuid.uuid4().hex[:12]
        output = job.output_name or f"{job.model_name}@{job_id}"
        self._store.insert(
            job_id,
            job.as_dict(),
            output_name=output,
            total_steps=job.params.steps,
            memory_mb=round(memory, 1),
            now=self._clock(),
        )
        metrics.jobs_total.labels(job.job_type).inc()
        self._schedule()
        return job_id

    def list_jobs(self) -> list[dict[str, Any]]:
        """Return every job, oldest first (without loss histories)."""
        return [j.as_dict() for j in self._store.jobs()]

    def get(self, job_id: str) -> dict[str, Any]:
        """Return one job with its loss history."""
        job = self._store.get(job_id)
        if job is None:
            raise JobNotFound(f"no learning job {job_id}")
        return job.as_dict()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one at once, a running one before its next step."""
        job = self._store.get(job_id, history=False)
        if job is None:
            raise JobNotFound(f"no learning job {job_id}")
        now = self._clock()
        if job.status == "queued":
            if self._store.finish(job_id, "cancelled", now):
                metrics.jobs_cancelled_total.labels(job.job_type).inc()
            self._waiting_since.pop(job_id, None)
        elif job.status == "running":
            run = self._running.get(job_id)
            self._store.set_status(job_id, "cancelling", now, only_from=("running",))
            if run is not None:
                run.cancel.set()
        self._schedule()
        return self.get(job_id)

    # -- internals ----------------------------------------------------------------------------

    def _resolve_checked(self, field_name: str, name: str) -> Path:
        try:
            path = Path(self._resolve(name))
        except MocError:
            raise
        except Exception as exc:  # a resolver's own failure names the model
            raise ModelNotFound(f"{field_name}: cannot find model {name!r}: {exc}") from exc
        if not path.is_file():
            raise ModelNotFound(f"{field_name}: model {name!r} has no file at {path}")
        return path

    def tick(self) -> None:
        """Retry waiting jobs (sent by the ticker thread)."""
        self._schedule()

    def _schedule(self) -> None:
        """Start queued jobs in priority-then-age order while slots and memory allow."""
        if self._stopping.is_set():
            return
        queued = queue_order(self._store.jobs(("queued",)))
        metrics.jobs_queued.set(len(queued))
        for job in queued:
            if len(self._running) >= self.config.max_parallel_jobs:
                break
            outcome = self._try_claim(job.id, job.memory_mb, job.job_type)
            if outcome == "wait":
                break  # strict order: lower priorities wait behind a job waiting for memory
            if outcome == "claimed":
                self._start(job.id)
        metrics.jobs_running.set(len(self._running))

    def _try_claim(self, job_id: str, mb: float, job_type: str) -> str:
        """Claim a job's memory: "claimed", "wait" (retry later) or "failed" (job failed)."""
        now = time.monotonic()
        try:
            ok = self._claim(job_id, mb)
        except Exception as exc:  # the ledger refused outright (e.g. larger than any device)
            self._fail(job_id, job_type, JobMemoryUnavailable(f"cannot claim {mb:.0f} MiB: {exc}"))
            return "failed"
        if ok:
            self._waiting_since.pop(job_id, None)
            return "claimed"
        since = self._waiting_since.setdefault(job_id, now)
        if now - since >= self.config.memory_wait_s:
            self._waiting_since.pop(job_id, None)
            self._fail(
                job_id,
                job_type,
                JobMemoryUnavailable(
                    f"needs {mb:.0f} MiB of device memory, which serving models hold; waited "
                    f"{now - since:.0f} s (learning.memory_wait_s)"
                ),
            )
            return "failed"
        self._store.set_detail(job_id, f"waiting for {mb:.0f} MiB of device memory", self._clock())
        return "wait"

    def _fail(self, job_id: str, job_type: str, error: Exception) -> None:
        if self._store.finish(job_id, "failed", self._clock(), error=str(error)):
            metrics.jobs_failed_total.labels(job_type).inc()

    def _start(self, job_id: str) -> None:
        job = self._store.get(job_id, history=False)
        assert job is not None
        self._store.mark_running(job_id, self._clock())
        job = self._store.get(job_id, history=False)
        assert job is not None
        from actors.learning.runner import JobContext, run_job  # torch: on first job only

        run = _Running(thread=threading.Thread(), started=time.monotonic())
        ctx = JobContext(
            job=job,
            config=self.config,
            store=self._store,
            resolve_model=self._resolve,
            cancel=run.cancel,
            stop=self._stopping,
            on_progress=self._on_progress,
            clock=self._clock,
        )
        proxy = self.actor_ref.proxy()

        def body() -> None:
            result: JobResult | Exception
            try:
                result = run_job(ctx)
                if result.ending == "completed" and result.output_path is not None:
                    self._register(job.output_name, result.output_path, result.lora_base)
            except Exception as exc:
                log.exception("learning job %s failed", job_id)
                result = exc
            # When the actor is gone, stop_all joined this thread and recorded the state.
            with contextlib.suppress(pykka.ActorDeadError):
                proxy.job_ended(job_id, result)

        run.thread = threading.Thread(target=body, name=f"learning-{job_id}", daemon=True)
        self._running[job_id] = run
        metrics.jobs_running.set(len(self._running))
        run.thread.start()

    def job_ended(self, job_id: str, result: JobResult | Exception) -> None:
        """Record how a job thread ended, release its memory and start what can run next."""
        run = self._running.pop(job_id, None)
        job = self._store.get(job_id, history=False)
        self._release_claim(job_id)
        if job is None or run is None:
            return
        now = self._clock()
        duration = time.monotonic() - run.started
        if isinstance(result, Exception):
            detail = (
                str(result)
                if isinstance(result, MocError)
                else f"{type(result).__name__}: {result}"
            )
            self._fail(
                job_id, job.job_type, result if isinstance(result, MocError) else Exception(detail)
            )
            metrics.job_duration_seconds.labels(job.job_type).observe(duration)
        elif result.ending == "completed":
            if self._store.finish(job_id, "completed", now, output_path=str(result.output_path)):
                metrics.jobs_completed_total.labels(job.job_type).inc()
            metrics.job_duration_seconds.labels(job.job_type).observe(duration)
        elif result.ending == "cancelled":
            if self._store.finish(job_id, "cancelled", now):
                metrics.jobs_cancelled_total.labels(job.job_type).inc()
        else:  # stopped for shutdown: keep it queued for the restart
            self._store.set_status(job_id, "queued", now, only_from=("running", "cancelling"))
        self._schedule()

    def _release_claim(self, job_id: str) -> None:
        try:
            self._release(job_id)
        except Exception:  # releasing must never take the actor down
            log.exception("releasing the memory claim of learning job %s failed", job_id)


__all__ = ["FINAL", "LearningActor"]
