"""The LearningActor: accepts job specs, queues them, runs up to `max_parallel_jobs` at once.

Each running job trains in a child process of its own (`job_supervisor.JobProcess`, forked
from the learning fork server that imported torch once), not in a thread of the node: a
training loop in the node's interpreter held the GIL often enough to delay the node's gossip
acks and peer RPC, and a crash inside torch would have taken the node down. The fork server
starts in the background at the first submit (a node that never trains never imports torch
anywhere), so only that first job waits for the torch import; later jobs' processes are up in
a fraction of a second instead of an interpreter start and the torch import each. The
child opens the same job store (SQLite WAL) and writes progress, losses, metrics and
checkpoints there, so `get` and `list_jobs` read the truth from the store as before; its
progress events come back over a pipe for `on_progress`.

Cancel marks the job "cancelling" and sends SIGTERM: the child stops before its next step; one
that does not exit within `stop_grace_s` is killed. Either way the job ends "cancelled". Node
shutdown (`stop_all`) does the same but leaves the jobs queued, to resume from their last
checkpoint. A child that dies on its own (a signal, an exit code) fails its job with an error
naming how it ended. `register` (making the output servable) and the memory `claim`/`release`
stay here in the node: the actor calls them when the child's end is reported.

Memory: before a job starts it claims its estimated peak memory through `claim(job_id, mb)`
(the node maps it onto the device ledger, so a serving model is never pushed out or OOMed by
training); a refused claim leaves the job queued and retried every `retry_interval_s`, and after
`memory_wait_s` it fails with a clear error. The queue is strict: a job that waits for memory
holds back the lower-priority jobs behind it, so a large urgent job is not starved.

The actor itself never blocks on a job: supervisor threads report ends with messages
(`job_ended`), and a ticker thread sends `tick` to retry waiting claims.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pykka

from actors.bridge import LoopReplyActor, Reply
from actors.errors import MocError, ModelNotFound, NameTaken
from actors.learning import metrics
from actors.learning.config import LearningConfig
from actors.learning.datasets import load_dataset
from actors.learning.errors import (
    InvalidJobSpec,
    JobMemoryUnavailable,
    JobNotFound,
    UnsupportedModel,
)
from actors.learning.estimate import estimate_memory_mb
from actors.learning.gguf_io import read_params
from actors.learning.job_process import describe_error
from actors.learning.job_supervisor import JobExit, JobProcess, warm_up
from actors.learning.jobs import FINAL, JobStore, JobStoreFull, TooManyJobs, queue_order
from actors.learning.spec import TrainParams, parse_spec
from actors.serving.estimate import read_gguf_header

log = logging.getLogger(__name__)

Claim = Callable[[str, float], bool]
Release = Callable[[str], None]
ResolveModel = Callable[[str], Path]
Register = Callable[[str, Path, "str | None", Reply[None]], None]
"""Make a job's output servable; answer the `Reply` when done, from any thread (never block)."""
OnProgress = Callable[[dict[str, Any]], None]


@dataclass
class _Running:
    process: JobProcess
    started: float
    cancelled: bool = False


Settlement = Literal["complete", "cancel", "requeue", "fail"]


def settle(ended: JobExit, *, cancelled: bool, stopping: bool) -> Settlement:
    """Decide what a job's end means for its row.

    A completed run completes even when a cancel raced it (the output exists). A stopped or
    killed run is a cancel when the client asked for one, and otherwise waits in the queue to
    resume from its checkpoint (node shutdown, or a SIGTERM from outside the node). A run that
    failed or died on its own fails, unless a cancel or a shutdown was already under way.
    """
    if ended.ending == "completed":
        return "complete"
    if cancelled:
        return "cancel"
    if ended.ending == "stopped" or stopping:
        return "requeue"
    return "fail"


def _model_params(path: Path) -> Any:
    import gguf

    # The bounded header parser first: gguf's reader trusts the lengths a file claims.
    read_gguf_header(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader parses untrusted bytes: any failure is the file's
        raise UnsupportedModel(f"cannot read GGUF {path}: {exc}") from exc
    return read_params(reader)


class LearningActor(LoopReplyActor):
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
        """Stop every running job's process and wait for it; the jobs stay queued for a restart.

        Children get SIGTERM and stop before their next step; one still there after
        `stop_grace_s` (or `timeout`, if shorter) is killed. A job that completed meanwhile
        is recorded as completed.
        """
        self._stopping.set()
        grace = min(self.config.stop_grace_s, timeout)
        for run in self._running.values():
            run.process.terminate(grace)
        deadline = time.monotonic() + timeout
        for job_id, run in list(self._running.items()):
            run.process.join(deadline - time.monotonic())
            ended = run.process.outcome
            if ended is None:  # its supervisor is stuck (in on_progress): the row says "running"
                self._store.set_status(job_id, "queued", self._clock(), only_from=("running",))
                self._release_claim(job_id)
            else:
                self._record_end(job_id, run, ended)
        self._running.clear()

    # -- the API ------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> str:
        """Check a job spec and its dataset, queue the job and return its id."""
        if self._stopping.is_set():
            raise InvalidJobSpec("spec", "the learning actor is stopping")
        job = parse_spec(
            spec, default_steps=self.config.default_steps, max_steps=self.config.max_steps
        )
        self._make_room()  # before any work: the dataset is read next
        if job.output_name is not None and not job.replace:
            self._refuse_taken(job.output_name)  # before any work: the dataset is read next
        load_dataset(job.dataset_path, job.job_type, self.config.dataset_dirs)
        base = self._resolve_checked("model_name", job.model_name)
        teacher = None
        if job.params.teacher is not None:
            teacher = _model_params(
                self._resolve_checked("training_params.teacher", job.params.teacher)
            )
        params = _model_params(base)
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
        warm_up()  # the first submit starts the fork server (in the background)
        self._schedule()
        return job_id

    def list_jobs(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Return the jobs oldest first (without loss histories): at most `limit` (None: all)
        from position `offset`."""
        return [j.as_dict() for j in self._store.jobs(limit=limit, offset=offset)]

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
                run.cancelled = True
                run.process.terminate(self.config.stop_grace_s)
        self._schedule()
        return self.get(job_id)

    # -- internals ----------------------------------------------------------------------------

    def _make_room(self) -> None:
        """Refuse a job past the queue cap (429); prune finished ones past the stored cap (507
        if none can go)."""
        limits = self.config
        queued = self._store.count(("queued",))
        if queued >= limits.max_queued_jobs:
            raise TooManyJobs(
                f"{queued} learning jobs are waiting to run, the limit "
                f"(learning.max_queued_jobs = {limits.max_queued_jobs}); retry when the queue "
                "has moved"
            )
        pruned = self._store.prune_finished(limits.max_stored_jobs - 1)
        if pruned:
            log.info("pruned the %d oldest finished job(s): learning.max_stored_jobs", pruned)
        stored = self._store.count()
        if stored >= limits.max_stored_jobs:
            raise JobStoreFull(
                f"the job store holds {stored} jobs, the limit (learning.max_stored_jobs = "
                f"{limits.max_stored_jobs}), and none is finished so none can be pruned"
            )

    def _taken_by(self, output: str) -> str | None:
        """Say what already holds the model name `output`, or None if it is free."""
        try:
            self._resolve(output)
        except Exception:  # ModelNotFound, or a resolver's own failure: as _resolve_checked reads it
            pass
        else:
            return f"model {output!r} exists (in the catalog, loaded or a job's output)"
        for pending in self._store.jobs(("queued", "running", "cancelling")):
            if pending.output_name == output:
                return f"learning job {pending.id} will produce {output!r}"
        return None

    def _refuse_taken(self, output: str) -> None:
        taken = self._taken_by(output)
        if taken is not None:
            raise NameTaken(
                "output_name", f"{taken}; send \"replace\": true to replace it, or pick a new name"
            )

    def _refuse_taken_at_end(self, output: str) -> None:
        try:
            self._resolve(output)
        except Exception:
            return
        raise NameTaken("output_name", f"model {output!r} appeared while the job ran")

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
        try:  # the resolver is the node's: the child gets the files it names
            models = {job.model_name: self._resolve_checked("model_name", job.model_name)}
            teacher = TrainParams(**job.spec["training_params"]).teacher
            if teacher is not None:
                models[teacher] = self._resolve_checked("training_params.teacher", teacher)
        except Exception as exc:
            self._release_claim(job_id)
            self._fail(job_id, job.job_type, Exception(describe_error(exc)))
            return
        self._store.mark_running(job_id, self._clock())
        proxy = self.actor_ref.proxy()

        def on_exit(ended: JobExit) -> None:
            # When the actor is gone, stop_all waited for this process and recorded its end.
            with contextlib.suppress(pykka.ActorDeadError):
                proxy.job_ended(job_id, ended)

        process = JobProcess(
            job_id, self.config, models, on_event=self._relay_progress, on_exit=on_exit
        )
        try:
            process.start()
        except OSError as exc:
            self._release_claim(job_id)
            self._fail(job_id, job.job_type, Exception(f"cannot start the training process: {exc}"))
            return
        self._running[job_id] = _Running(process=process, started=time.monotonic())
        metrics.jobs_running.set(len(self._running))

    def _relay_progress(self, event: dict[str, Any]) -> None:
        """Pass a child's progress event on (called on the job's supervisor thread)."""
        if self._on_progress is not None:
            self._on_progress(event)

    def job_ended(self, job_id: str, ended: JobExit) -> None:
        """Record how a job's process ended, release its memory and start what can run next."""
        run = self._running.pop(job_id, None)
        if run is None:  # stop_all already recorded it
            return
        self._record_end(job_id, run, ended)
        self._schedule()

    def _record_end(self, job_id: str, run: _Running, ended: JobExit) -> None:
        job = self._store.get(job_id, history=False)
        if job is None:
            self._release_claim(job_id)
            return
        now = self._clock()
        duration = time.monotonic() - run.started
        outcome = settle(ended, cancelled=run.cancelled, stopping=self._stopping.is_set())
        if outcome == "complete":
            assert ended.output_path is not None
            self._register_output(job_id, job.spec, job.output_name, ended, duration)
        elif outcome == "cancel":
            note = (
                f"did not stop within {self.config.stop_grace_s:g} s of the cancel and was "
                f"{ended.error}"
                if ended.killed
                else None
            )
            if self._store.finish(job_id, "cancelled", now, error=note):
                metrics.jobs_cancelled_total.labels(job.job_type).inc()
        elif outcome == "requeue":
            self._store.set_status(job_id, "queued", now, only_from=("running", "cancelling"))
        else:
            log.error("learning job %s failed: %s", job_id, ended.error)
            self._fail(job_id, job.job_type, Exception(ended.error or "failed"))
            metrics.job_duration_seconds.labels(job.job_type).observe(duration)
        self._release_claim(job_id)

    def _register_output(
        self, job_id: str, spec: dict[str, Any], output: str, ended: JobExit, duration: float
    ) -> None:
        """Ask the node to serve a completed job's output; the job ends when it answers.

        The answer comes back as a message (`output_registered`): waiting for it here would
        block this actor on another actor's reply.
        """
        assert ended.output_path is not None
        proxy = self.actor_ref.proxy()
        path = str(ended.output_path)

        def answered(_: None, error: Exception | None) -> None:
            with contextlib.suppress(pykka.ActorDeadError):  # stopped: the job is resumed later
                proxy.output_registered(job_id, path, duration, error)

        try:
            if not spec.get("replace", False):
                # Checked at submit; checked again, as a model may have taken the name since.
                self._refuse_taken_at_end(output)
            self._register(output, ended.output_path, ended.lora_base, answered)
        except Exception as exc:
            self.output_registered(job_id, path, duration, exc)

    def output_registered(
        self, job_id: str, output_path: str, duration: float, error: Exception | None
    ) -> None:
        """Complete a job whose output is now served, or fail it naming why it cannot be."""
        job = self._store.get(job_id, history=False)
        if job is None:
            return
        if error is None:
            if self._store.finish(job_id, "completed", self._clock(), output_path=output_path):
                metrics.jobs_completed_total.labels(job.job_type).inc()
        else:
            if isinstance(error, MocError):
                log.warning("learning job %s: cannot register its output: %s", job_id, error)
            else:
                log.error("registering the output of learning job %s failed", job_id, exc_info=error)
            self._fail(job_id, job.job_type, Exception(f"cannot register the output: {error}"))
        metrics.job_duration_seconds.labels(job.job_type).observe(duration)

    def _release_claim(self, job_id: str) -> None:
        try:
            self._release(job_id)
        except Exception:  # releasing must never take the actor down
            log.exception("releasing the memory claim of learning job %s failed", job_id)


__all__ = ["FINAL", "LearningActor"]
