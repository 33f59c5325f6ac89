"""Step executors: how each kind of step is carried out, behind one Protocol.

An executor runs in a goal's step thread, never in the GoalActor's own thread, so it may wait
(on a learning job, a helper process, a model load). It must stop waiting soon after
`ctx.interrupt` fires: on "cancel" it undoes what it started (cancels its learning job); on
"stop" (the node shuts down) it leaves everything running, because the step resumes after the
restart. Anything a resumed step needs to find again (a job id) goes through `ctx.attach`
before the executor waits on it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pykka

from actors.errors import ModelAlreadyLoaded, ModelNotLoaded
from actors.goals.config import GoalsConfig
from actors.goals.evalset import read_eval_set
from actors.goals.model import (
    DeployStep,
    EvaluateStep,
    GateStep,
    Step,
    StepKind,
    TrainStep,
    UnloadStep,
)
from actors.goals.plan import StepInputs, gate_verdict

log = logging.getLogger(__name__)

ResolveModel = Callable[[str], Path]
ModelAction = Callable[[str], object]
OutcomeStatus = Literal["completed", "failed", "cancelled", "interrupted"]
# How long one call into the learning actor may take before the step gives up on it.
LEARNING_CALL_TIMEOUT_S = 60.0


class LearningService(Protocol):
    """The learning jobs API a train step drives (the LearningActor's proxy, unwrapped)."""

    def submit(self, spec: dict[str, Any]) -> str:
        """Queue a job; return its id."""

    def get(self, job_id: str) -> dict[str, Any]:
        """Return a job: `status` (queued|running|completed|failed|cancelled|...), `progress`,
        `error`, and once completed the servable result's name (`result_model` or
        `output_name`)."""

    def list_jobs(self) -> list[dict[str, Any]]:
        """Return every job."""

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job."""


class ProxyLearning:
    """A LearningService over a pykka actor proxy: waits on each future from the step thread."""

    def __init__(self, proxy: Any, timeout: float = LEARNING_CALL_TIMEOUT_S) -> None:
        self._proxy = proxy
        self._timeout = timeout

    def submit(self, spec: dict[str, Any]) -> str:
        return str(self._proxy.submit(spec).get(timeout=self._timeout))

    def get(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._proxy.get(job_id).get(timeout=self._timeout)
        return result

    def list_jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._proxy.list_jobs().get(timeout=self._timeout)
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._proxy.cancel(job_id).get(timeout=self._timeout)
        return result


def as_learning_service(learning: Any) -> LearningService:
    """Accept a LearningService or a pykka proxy / ref of the LearningActor."""
    if isinstance(learning, pykka.ActorRef):
        return ProxyLearning(learning.proxy())
    if isinstance(learning, pykka.ActorProxy):
        return ProxyLearning(learning)
    service: LearningService = learning
    return service


class Interrupt:
    """Tells a running step to let go: "cancel" (undo what it started) or "stop" (leave it)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: Literal["cancel", "stop"] | None = None
        self._lock = threading.Lock()

    def fire(self, reason: Literal["cancel", "stop"]) -> None:
        """Interrupt the step; the first reason given wins."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: until interrupted); return True if interrupted."""
        return self._event.wait(timeout)

    def is_set(self) -> bool:
        """Return True once interrupted."""
        return self._event.is_set()


@dataclass
class StepContext:
    """What a step knows about where it runs and how it reports."""

    goal_id: str
    index: int
    inputs: StepInputs
    handle: str | None = None  # what an earlier attempt attached to
    first_started_at: float | None = None  # wall time of the step's first start
    resumed: bool = False  # an earlier attempt ran (the node restarted meanwhile)
    attach: Callable[[str], None] = lambda handle: None  # durable before it returns
    progress: Callable[[float], None] = lambda fraction: None
    interrupt: Interrupt = field(default_factory=Interrupt)


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """How a step ended: completed or failed (the goal moves on or fails), cancelled (the goal
    was cancelled and the step undid its work), or interrupted (the node is stopping: the step
    stays running and resumes after the restart)."""

    status: OutcomeStatus
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def done(cls, **result: Any) -> StepOutcome:
        """Return a completed outcome with `result`."""
        return cls("completed", result)

    @classmethod
    def failed(cls, error: str, **result: Any) -> StepOutcome:
        """Return a failed outcome with its reason."""
        return cls("failed", result, error)


class StepExecutor(Protocol):
    """Carries out one kind of step."""

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        """Run the step to its end (or until interrupted) and say how it ended."""


def _let_go(ctx: StepContext, **result: Any) -> StepOutcome:
    status: OutcomeStatus = "cancelled" if ctx.interrupt.reason == "cancel" else "interrupted"
    return StepOutcome(status, result)


# -- train ------------------------------------------------------------------------------------


class TrainExecutor:
    """Submit a learning job, record its id, then follow it to its end."""

    def __init__(self, learning: LearningService, poll_interval_s: float = 1.0) -> None:
        self._learning = learning
        self._poll = poll_interval_s

    @staticmethod
    def output_name(step: TrainStep, ctx: StepContext) -> str:
        """Return the job's result name: the spec's own, else one unique to this goal step."""
        given = step.job.get("output_name")
        return str(given) if given else f"{step.base}@goal-{ctx.goal_id}-{ctx.index}"

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        assert isinstance(step, TrainStep)
        output = self.output_name(step, ctx)
        job_id = ctx.handle or self._orphan(output, ctx)
        if job_id is None:
            if ctx.interrupt.is_set():
                return _let_go(ctx)
            try:
                job_id = self._learning.submit({**dict(step.job), "output_name": output})
            except pykka.ActorDeadError:
                return self._learning_gone(ctx, None)
            except Exception as exc:
                return StepOutcome.failed(f"the learning job was refused: {exc}")
        if job_id != ctx.handle:
            ctx.attach(job_id)
        return self._follow(job_id, ctx)

    def _orphan(self, output: str, ctx: StepContext) -> str | None:
        """Find the job an earlier attempt submitted but died before recording."""
        if not ctx.resumed or ctx.first_started_at is None:
            return None
        try:
            jobs = self._learning.list_jobs()
        except Exception as exc:
            log.warning("goal %s: cannot list learning jobs: %s", ctx.goal_id, exc)
            return None
        for job in reversed(jobs):
            created = job.get("created_at")
            if (
                job.get("output_name") == output
                and isinstance(created, int | float)
                and created >= ctx.first_started_at - 1.0
            ):
                log.info("goal %s: re-attaching to job %s", ctx.goal_id, job.get("job_id"))
                return str(job["job_id"])
        return None

    @staticmethod
    def _learning_gone(ctx: StepContext, job_id: str | None) -> StepOutcome:
        """Wait for the stop that follows the learning actor's own (the node is shutting down).

        Failing here would fail the goal for a shutdown race; the step resumes after the restart.
        """
        log.warning("goal %s: the learning actor is gone; waiting for the stop", ctx.goal_id)
        ctx.interrupt.wait(None)
        return StepOutcome(
            "interrupted" if ctx.interrupt.reason == "stop" else "cancelled",
            {"job_id": job_id} if job_id else {},
        )

    def _follow(self, job_id: str, ctx: StepContext) -> StepOutcome:
        while True:
            if ctx.interrupt.is_set():
                if ctx.interrupt.reason == "cancel":
                    try:
                        self._learning.cancel(job_id)
                    except Exception as exc:
                        log.warning("goal %s: cancelling job %s: %s", ctx.goal_id, job_id, exc)
                        return StepOutcome("cancelled", {"job_id": job_id}, str(exc))
                return _let_go(ctx, job_id=job_id)
            try:
                job = self._learning.get(job_id)
            except pykka.ActorDeadError:
                return self._learning_gone(ctx, job_id)
            except Exception as exc:
                return StepOutcome.failed(f"learning job {job_id} cannot be read: {exc}")
            status = job.get("status")
            progress = job.get("progress")
            if isinstance(progress, int | float):
                ctx.progress(float(progress))
            if status == "completed":
                model = job.get("result_model") or job.get("output_name")
                if not model:
                    return StepOutcome.failed(f"learning job {job_id} completed without a model")
                return StepOutcome.done(
                    job_id=job_id, result_model=model, metrics=job.get("metrics") or {}
                )
            if status == "failed":
                return StepOutcome.failed(
                    f"learning job {job_id} failed: {job.get('error') or 'no reason given'}",
                    job_id=job_id,
                )
            if status == "cancelled":
                return StepOutcome.failed(
                    f"learning job {job_id} was cancelled outside this goal", job_id=job_id
                )
            ctx.interrupt.wait(self._poll)


# -- evaluate ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EvalSettings:
    """How evaluations run (from GoalsConfig)."""

    n_ctx: int = 512
    max_tokens: int = 8192
    timeout_s: float = 1800.0
    n_threads: int = 0


class EvaluateExecutor:
    """Score base and candidate on the step's evaluation set in a llama.cpp helper process."""

    def __init__(
        self,
        resolve_model: ResolveModel,
        eval_dirs: Sequence[str | Path],
        settings: EvalSettings = EvalSettings(),
    ) -> None:
        self._resolve = resolve_model
        self.eval_dirs = tuple(eval_dirs)
        self._settings = settings

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        assert isinstance(step, EvaluateStep)
        base, candidate = ctx.inputs.base, ctx.inputs.candidate
        if base is None or candidate is None:
            return StepOutcome.failed("no base or candidate model to evaluate")
        try:
            records = read_eval_set(step.eval_path, self.eval_dirs)
            base_path = Path(self._resolve(base))
            candidate_path = Path(self._resolve(candidate))
        except Exception as exc:
            return StepOutcome.failed(str(exc))
        request = {
            "records": [asdict(r) for r in records],
            "n_ctx": self._settings.n_ctx,
            "max_tokens": step.max_tokens or self._settings.max_tokens,
            "n_threads": self._settings.n_threads,
            "base_path": str(base_path),
            "candidate_path": str(candidate_path),
        }
        answer = self._in_helper(request, ctx)
        if isinstance(answer, StepOutcome):
            return answer
        if not answer.get("ok"):
            return StepOutcome.failed(f"evaluation failed: {answer.get('error')}")
        ctx.progress(1.0)
        return StepOutcome.done(
            base={"model": base, **answer["base"]},
            candidate={"model": candidate, **answer["candidate"]},
            candidate_is_adapter=answer["candidate_is_adapter"],
            eval_path=step.eval_path,
        )

    def _in_helper(self, request: dict[str, Any], ctx: StepContext) -> dict[str, Any] | StepOutcome:
        """Run `actors.goals.scoring` in a child process; kill it if interrupted or too slow."""
        with tempfile.TemporaryDirectory(prefix="moc-eval-") as tmp:
            req, res, err = Path(tmp, "request.json"), Path(tmp, "result.json"), Path(tmp, "err")
            req.write_text(json.dumps(request))
            with err.open("wb") as stderr:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "actors.goals.scoring", str(req), str(res)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            deadline = time.monotonic() + self._settings.timeout_s
            try:
                while proc.poll() is None:
                    if ctx.interrupt.wait(0.1):
                        return _let_go(ctx)
                    if time.monotonic() > deadline:
                        return StepOutcome.failed(
                            f"evaluation took longer than {self._settings.timeout_s:.0f} s"
                        )
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            try:
                answer: dict[str, Any] = json.loads(res.read_text())
            except (OSError, ValueError):
                tail = err.read_bytes()[-500:].decode("utf-8", "replace").strip()
                return StepOutcome.failed(
                    f"the evaluation process died (exit code {proc.returncode}): {tail}"
                )
            return answer


# -- gate, deploy, unload ---------------------------------------------------------------------


class GateExecutor:
    """Let the goal go on only if the latest evaluation shows a sufficient improvement."""

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        assert isinstance(step, GateStep)
        verdict = gate_verdict(step, ctx.inputs.evaluation)
        if verdict.passed:
            return StepOutcome.done(**verdict.as_dict())
        return StepOutcome.failed(f"gate not passed: {verdict.reason}", **verdict.as_dict())


class DeployExecutor:
    """Load the model for serving through the node; an already loaded model counts as deployed."""

    def __init__(self, load: ModelAction) -> None:
        self._load = load

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        assert isinstance(step, DeployStep)
        model = ctx.inputs.candidate
        if model is None:
            return StepOutcome.failed("no model to deploy")
        try:
            self._load(model)
        except ModelAlreadyLoaded:
            return StepOutcome.done(model=model, already_loaded=True)
        except Exception as exc:
            return StepOutcome.failed(f"loading {model!r} failed: {exc}")
        return StepOutcome.done(model=model, already_loaded=False)


class UnloadExecutor:
    """Unload a model through the node; a model that is not loaded counts as unloaded."""

    def __init__(self, unload: ModelAction) -> None:
        self._unload = unload

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        assert isinstance(step, UnloadStep)
        try:
            self._unload(step.model)
        except ModelNotLoaded:
            return StepOutcome.done(model=step.model, was_loaded=False)
        except Exception as exc:
            return StepOutcome.failed(f"unloading {step.model!r} failed: {exc}")
        return StepOutcome.done(model=step.model, was_loaded=True)


def default_executors(
    config: GoalsConfig,
    *,
    learning: LearningService,
    resolve_model: ResolveModel,
    load: ModelAction,
    unload: ModelAction,
    eval_dirs: Sequence[str | Path] = (),
) -> dict[StepKind, StepExecutor]:
    """Build the production executors."""
    settings = EvalSettings(
        n_ctx=config.eval_n_ctx,
        max_tokens=config.eval_max_tokens,
        timeout_s=config.eval_timeout_s,
        n_threads=config.eval_threads,
    )
    return {
        "train": TrainExecutor(learning, config.poll_interval_s),
        "evaluate": EvaluateExecutor(resolve_model, (*eval_dirs, *config.eval_dirs), settings),
        "gate": GateExecutor(),
        "deploy": DeployExecutor(load),
        "unload": UnloadExecutor(unload),
    }
