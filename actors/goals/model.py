"""The goal types: a goal, its plan of typed steps, and the state of each step (frozen, no I/O).

A plan is a tuple of steps; each kind is its own dataclass, so a step carries exactly the
fields its kind needs. A field left None refers to what an earlier step produced: the model a
`train` step trained (the "candidate") or the model it trained from (the "base").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Priority = Literal["critical", "high", "medium", "low"]
# Higher runs first; within one priority the older goal runs first.
PRIORITY_RANK: Mapping[str, int] = {"critical": 3, "high": 2, "medium": 1, "low": 0}
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "medium", "low")

GoalStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
FINAL_GOAL: tuple[GoalStatus, ...] = ("completed", "failed", "cancelled")
StepStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
StepKind = Literal["train", "evaluate", "gate", "deploy", "unload"]
STEP_KINDS: tuple[StepKind, ...] = ("train", "evaluate", "gate", "deploy", "unload")
Metric = Literal["loss", "perplexity"]


@dataclass(frozen=True, slots=True)
class TrainStep:
    """Run one learning job (its spec as the learning service takes it) and follow it to the end."""

    kind: ClassVar[StepKind] = "train"
    job: Mapping[str, Any]

    @property
    def base(self) -> str:
        """Return the model the job trains from."""
        return str(self.job.get("model_name", ""))


@dataclass(frozen=True, slots=True)
class EvaluateStep:
    """Score base and candidate on an evaluation set through llama.cpp (mean loss, perplexity)."""

    kind: ClassVar[StepKind] = "evaluate"
    eval_path: str
    base: str | None = None  # None: the model the latest train step trained from
    candidate: str | None = None  # None: the model the latest train step produced
    max_tokens: int | None = None  # None: [goals] eval_max_tokens


@dataclass(frozen=True, slots=True)
class GateStep:
    """Continue only if the candidate beats the base by `min_improvement` on the latest evaluation.

    "Beats" means strictly lower `metric` and at least `min_improvement` lower relative to the
    base: candidate <= base * (1 - min_improvement). An identical candidate never passes.
    """

    kind: ClassVar[StepKind] = "gate"
    min_improvement: float
    metric: Metric = "loss"


@dataclass(frozen=True, slots=True)
class DeployStep:
    """Load a model for serving (the candidate unless named)."""

    kind: ClassVar[StepKind] = "deploy"
    model: str | None = None


@dataclass(frozen=True, slots=True)
class UnloadStep:
    """Unload a model (e.g. the base once its successor is deployed)."""

    kind: ClassVar[StepKind] = "unload"
    model: str


Step = TrainStep | EvaluateStep | GateStep | DeployStep | UnloadStep


def step_as_dict(step: Step) -> dict[str, Any]:
    """Return a step as stored and reported: its kind and its fields."""
    if isinstance(step, TrainStep):
        return {"kind": "train", **dict(step.job)}
    fields: dict[str, Any] = {"kind": step.kind}
    for name in step.__dataclass_fields__:
        fields[name] = getattr(step, name)
    return fields


@dataclass(frozen=True, slots=True)
class GoalDraft:
    """A checked goal spec, before it is stored and given an id."""

    title: str
    description: str
    priority: Priority
    steps: tuple[Step, ...]
    legacy: bool
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StepState:
    """What is known about one step of one goal."""

    index: int
    kind: StepKind
    status: StepStatus = "pending"
    handle: str | None = None  # what the executor attached to (a train step's job id)
    progress: float = 0.0  # 0..1
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0  # starts, resumes after a restart included
    started_at: float | None = None
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the step state as the API reports it."""
        return {
            "index": self.index,
            "kind": self.kind,
            "status": self.status,
            "handle": self.handle,
            "progress": self.progress,
            "result": dict(self.result),
            "error": self.error,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass(frozen=True, slots=True)
class Goal:
    """A stored goal: its plan, where it stands and every step's state."""

    id: str
    seq: int  # insertion order: first come, first served within a priority
    title: str
    description: str
    priority: Priority
    steps: tuple[Step, ...]
    states: tuple[StepState, ...]
    status: GoalStatus = "pending"
    current_step: int = 0
    error: str | None = None
    legacy: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def progress(self) -> float:
        """Return the fraction of the plan done: finished steps plus the current step's share."""
        if not self.steps:
            return 1.0
        if self.status == "completed":
            return 1.0
        done = sum(s.status == "completed" for s in self.states)
        current = self.states[self.current_step] if self.current_step < len(self.states) else None
        partial = current.progress if current is not None and current.status == "running" else 0.0
        return min(1.0, (done + partial) / len(self.steps))

    def as_dict(self) -> dict[str, Any]:
        """Return the goal as the API reports it."""
        return {
            "goal_id": self.id,
            "title": self.title,
            "description": self.description,
            "priority": self.priority,
            "status": self.status,
            "progress": round(self.progress, 4),
            "current_step": self.current_step,
            "error": self.error,
            "legacy": self.legacy,
            "metadata": dict(self.metadata),
            "steps": [
                {**step_as_dict(step), "state": state.as_dict()}
                for step, state in zip(self.steps, self.states, strict=True)
            ],
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
