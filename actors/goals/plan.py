"""Pure decisions about goals: parse and check plans, turn legacy goals into plans, order goals,
pass results from step to step, judge a gate and say what a finished step means for its goal.

Nothing here does I/O or reads a clock; the actor calls these and acts on the answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actors import names
from actors.errors import InvalidRequest
from actors.goals.config import GoalsConfig
from actors.goals.errors import InvalidGoal
from actors.goals.model import (
    PRIORITIES,
    PRIORITY_RANK,
    STEP_KINDS,
    DeployStep,
    EvaluateStep,
    GateStep,
    Goal,
    GoalDraft,
    GoalStatus,
    Priority,
    Step,
    StepState,
    TrainStep,
    UnloadStep,
)

JOB_TYPES = ("lora", "fine_tune", "rlhf", "distillation")
LEGACY_PLAN = "train → evaluate → gate → deploy"
# Metadata a legacy goal needs, with what each is for (the refusal says exactly this).
LEGACY_REQUIRED: tuple[tuple[str, str], ...] = (
    ("model_name", "the base model to train"),
    ("dataset_path", "the JSONL training data"),
)
# Metadata is stored and echoed as given: a few levels are plenty, and a bound keeps encoding it
# (json.dumps recurses) from ever meeting Python's recursion limit.
MAX_METADATA_DEPTH = 32
_STEP_FIELDS: dict[str, frozenset[str]] = {
    "evaluate": frozenset({"eval_path", "base", "candidate", "max_tokens"}),
    "gate": frozenset({"min_improvement", "metric"}),
    "deploy": frozenset({"model"}),
    "unload": frozenset({"model"}),
}


# -- parsing ----------------------------------------------------------------------------------


def parse_goal(spec: Any, config: GoalsConfig) -> GoalDraft:
    """Check a goal spec, legacy (`metadata`, no `steps`) or new (`steps`); name the bad field."""
    if not isinstance(spec, Mapping):
        raise InvalidGoal("goal", "must be an object")
    title = _checked(names.check_title, spec.get("title"), "title")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise InvalidGoal("description", "must be a string")
    _checked(names.check_text, description, "description")
    if len(description) > config.max_description_chars:
        raise InvalidGoal(
            "description",
            f"is {len(description)} characters; the limit is {config.max_description_chars} "
            "(goals.max_description_chars)",
        )
    priority = parse_priority(spec.get("priority"))
    metadata = spec.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise InvalidGoal("metadata", "must be an object")
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidGoal("metadata", f"nests deeper than {MAX_METADATA_DEPTH} levels")
    size = len(json.dumps(metadata, separators=(",", ":"), default=str).encode("utf-8"))
    if size > config.max_metadata_bytes:
        raise InvalidGoal(
            "metadata",
            f"is {size} bytes as JSON; the limit is {config.max_metadata_bytes} "
            "(goals.max_metadata_bytes)",
        )
    if "steps" in spec:
        steps = parse_steps(spec["steps"], config, priority)
        return GoalDraft(title, description, priority, steps, legacy=False, metadata=metadata)
    steps = legacy_plan(metadata, priority, config)
    return GoalDraft(title, description, priority, steps, legacy=True, metadata=metadata)


def parse_priority(value: Any) -> Priority:
    """Map a priority name (any case; default medium) onto a Priority."""
    if value is None:
        return "medium"
    if isinstance(value, str) and value.lower() in PRIORITY_RANK:
        return PRIORITIES[len(PRIORITIES) - 1 - PRIORITY_RANK[value.lower()]]
    raise InvalidGoal("priority", "one of critical, high, medium, low")


def legacy_plan(
    metadata: Mapping[str, Any], priority: Priority, config: GoalsConfig
) -> tuple[Step, ...]:
    """Turn a legacy goal's metadata into the plan train → evaluate → gate → deploy.

    The training data doubles as the evaluation set unless `metadata.eval_path` names a held-out
    one; the gate demands `metadata.min_improvement` (default from config).
    """
    missing = [
        (key, why)
        for key, why in LEGACY_REQUIRED
        if not isinstance(metadata.get(key), str) or not metadata[key].strip()
    ]
    if missing:
        listed = ", ".join(f"metadata.{key} ({why})" for key, why in missing)
        raise InvalidGoal(
            f"metadata.{missing[0][0]}",
            f"a legacy goal becomes the plan {LEGACY_PLAN}; it is missing {listed}",
        )
    _checked(names.check_name, metadata["model_name"], "metadata.model_name")
    _checked(names.check_path, metadata["dataset_path"], "metadata.dataset_path")
    params = metadata.get("training_params", {})
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise InvalidGoal("metadata.training_params", "must be an object")
    job_type = metadata.get("job_type", config.legacy_job_type)
    if job_type not in JOB_TYPES:
        raise InvalidGoal("metadata.job_type", f"one of {', '.join(JOB_TYPES)}")
    job: dict[str, Any] = {
        "job_type": job_type,
        "model_name": metadata["model_name"],
        "dataset_path": metadata["dataset_path"],
        "priority": priority,
        "training_params": dict(params),
    }
    if metadata.get("output_name") is not None:
        job["output_name"] = _name(metadata, "output_name", "metadata.output_name")
    eval_path = metadata.get("eval_path", metadata["dataset_path"])
    if not isinstance(eval_path, str) or not eval_path.strip():
        raise InvalidGoal("metadata.eval_path", "must be a non-empty path")
    _checked(names.check_path, eval_path, "metadata.eval_path")
    improvement = _improvement(
        metadata.get("min_improvement", config.default_min_improvement), "metadata.min_improvement"
    )
    return (
        TrainStep(job=job),
        EvaluateStep(eval_path=eval_path),
        GateStep(min_improvement=improvement),
        DeployStep(),
    )


def parse_steps(raw: Any, config: GoalsConfig, priority: Priority) -> tuple[Step, ...]:
    """Check a new-style plan: a non-empty list of steps whose references can be resolved."""
    if not isinstance(raw, list) or not raw:
        raise InvalidGoal("steps", "a non-empty list of steps")
    if len(raw) > config.max_plan_steps:
        raise InvalidGoal("steps", f"at most {config.max_plan_steps} steps (max_plan_steps)")
    steps: list[Step] = []
    for i, item in enumerate(raw):
        steps.append(_parse_step(item, f"steps[{i}]", config, priority))
    check_references(steps)
    return tuple(steps)


def _parse_step(item: Any, where: str, config: GoalsConfig, priority: Priority) -> Step:
    if not isinstance(item, Mapping):
        raise InvalidGoal(where, "must be an object")
    kind = item.get("kind")
    if kind not in STEP_KINDS:
        raise InvalidGoal(f"{where}.kind", f"one of {', '.join(STEP_KINDS)}")
    if kind == "train":
        job = {k: v for k, v in item.items() if k != "kind"}
        _name(job, "model_name", f"{where}.model_name")
        _path(job, "dataset_path", f"{where}.dataset_path")
        if job.get("output_name") is not None:
            _name(job, "output_name", f"{where}.output_name")
        if job.get("job_type", "lora") not in JOB_TYPES:
            raise InvalidGoal(f"{where}.job_type", f"one of {', '.join(JOB_TYPES)}")
        job.setdefault("job_type", "lora")
        job.setdefault("priority", priority)
        return TrainStep(job=job)
    unknown = sorted(set(item) - {"kind"} - _STEP_FIELDS[kind])
    if unknown:
        raise InvalidGoal(f"{where}.{unknown[0]}", f"not a field of a {kind} step")
    if kind == "evaluate":
        max_tokens = item.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise InvalidGoal(f"{where}.max_tokens", "an integer >= 1")
        return EvaluateStep(
            eval_path=_path(item, "eval_path", f"{where}.eval_path"),
            base=_optional_name(item, "base", f"{where}.base"),
            candidate=_optional_name(item, "candidate", f"{where}.candidate"),
            max_tokens=max_tokens,
        )
    if kind == "gate":
        metric = item.get("metric", "loss")
        if metric not in ("loss", "perplexity"):
            raise InvalidGoal(f"{where}.metric", "one of loss, perplexity")
        improvement = _improvement(
            item.get("min_improvement", config.default_min_improvement),
            f"{where}.min_improvement",
        )
        return GateStep(min_improvement=improvement, metric=metric)
    if kind == "deploy":
        return DeployStep(model=_optional_name(item, "model", f"{where}.model"))
    return UnloadStep(model=_name(item, "model", f"{where}.model"))


def check_references(steps: Sequence[Step]) -> None:
    """Refuse a plan whose step needs a model or an evaluation that no earlier step provides."""
    trained = evaluated = False
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if isinstance(step, EvaluateStep):
            if not trained and step.base is None:
                raise InvalidGoal(f"{where}.base", "required when no train step comes before")
            if not trained and step.candidate is None:
                raise InvalidGoal(f"{where}.candidate", "required when no train step comes before")
            evaluated = True
        elif isinstance(step, GateStep) and not evaluated:
            raise InvalidGoal(where, "a gate needs an evaluate step before it")
        elif isinstance(step, DeployStep) and step.model is None and not trained:
            raise InvalidGoal(f"{where}.model", "required when no train step comes before")
        elif isinstance(step, TrainStep):
            trained = True


def _string(mapping: Mapping[str, Any], key: str, where: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidGoal(where, "required, a non-empty string")
    return value


def _name(mapping: Mapping[str, Any], key: str, where: str) -> str:
    return _checked(names.check_name, _string(mapping, key, where), where)


def _optional_name(mapping: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if mapping.get(key) is None else _name(mapping, key, where)


def _path(mapping: Mapping[str, Any], key: str, where: str) -> str:
    return _checked(names.check_path, _string(mapping, key, where), where)


def _checked(check: Any, value: Any, where: str) -> str:
    """Run a check of `actors.names`, refusing with this package's error class."""
    try:
        result: str = check(value, where)
    except InvalidRequest as exc:
        raise InvalidGoal(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None
    return result


def _depth(value: Any) -> int:
    """Return how deeply lists and objects nest in `value` (a scalar is 0), without recursing."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item
        if isinstance(item, Mapping | list | tuple):
            deepest = max(deepest, level + 1)
            if level + 1 <= MAX_METADATA_DEPTH:  # past the bound the answer is known
                stack.extend((child, level + 1) for child in children)
    return deepest


def _improvement(value: Any, where: str) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0 <= value < 1:
        raise InvalidGoal(where, "a fraction in [0, 1), e.g. 0.01 for 1% lower")
    return float(value)


# -- scheduling -------------------------------------------------------------------------------


def queue_key(goal: Goal) -> tuple[int, int]:
    """Order goals by priority (critical first), then by age (first come first)."""
    return (-PRIORITY_RANK[goal.priority], goal.seq)


def next_runnable(goals: Iterable[Goal], max_active: int) -> list[Goal]:
    """Return the pending goals to start now so that at most `max_active` run, in queue order."""
    goals = list(goals)
    running = sum(g.status == "running" for g in goals)
    room = max(0, max_active - running)
    pending = sorted((g for g in goals if g.status == "pending"), key=queue_key)
    return pending[:room]


# -- between steps ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What earlier steps hand to a step: model names and the latest evaluation."""

    base: str | None = None
    candidate: str | None = None
    evaluation: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the inputs as JSON-ready fields."""
        return {
            "base": self.base,
            "candidate": self.candidate,
            "evaluation": None if self.evaluation is None else dict(self.evaluation),
        }


def step_inputs(steps: Sequence[Step], states: Sequence[StepState], index: int) -> StepInputs:
    """Return what the completed steps before `index` produced for it."""
    base = candidate = None
    evaluation: Mapping[str, Any] | None = None
    for step, state in zip(steps[:index], states[:index], strict=True):
        if state.status != "completed":
            continue
        if isinstance(step, TrainStep):
            base = step.base
            candidate = state.result.get("result_model")
        elif isinstance(step, EvaluateStep):
            evaluation = state.result
    step = steps[index]
    if isinstance(step, EvaluateStep):
        base = step.base or base
        candidate = step.candidate or candidate
    elif isinstance(step, DeployStep):
        candidate = step.model or candidate
    elif isinstance(step, UnloadStep):
        candidate = step.model
    return StepInputs(base=base, candidate=candidate, evaluation=evaluation)


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """A gate's judgement: passed or not, the relative improvement and why."""

    passed: bool
    improvement: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Return the verdict as a step result."""
        return {"passed": self.passed, "improvement": self.improvement, "reason": self.reason}


def gate_verdict(step: GateStep, evaluation: Mapping[str, Any] | None) -> GateVerdict:
    """Judge the latest evaluation: the candidate must be strictly and sufficiently better."""
    if evaluation is None:
        return GateVerdict(False, 0.0, "no evaluation before this gate")
    try:
        base = float(evaluation["base"][step.metric])
        cand = float(evaluation["candidate"][step.metric])
    except (KeyError, TypeError, ValueError):
        return GateVerdict(False, 0.0, f"the evaluation has no {step.metric} for both models")
    if not (math.isfinite(base) and math.isfinite(cand)) or base <= 0:
        return GateVerdict(
            False,
            0.0,
            f"{step.metric} is not a positive finite number (base {base}, candidate {cand})",
        )
    improvement = (base - cand) / base
    need = f"{step.min_improvement:.2%}"
    figures = f"candidate {step.metric} {cand:.4f} vs base {base:.4f} ({improvement:+.2%})"
    if cand < base and improvement >= step.min_improvement:
        return GateVerdict(True, improvement, f"{figures}: beats the base by at least {need}")
    return GateVerdict(False, improvement, f"{figures}: does not beat the base by {need}")


@dataclass(frozen=True, slots=True)
class Transition:
    """What a finished step means for its goal."""

    status: GoalStatus
    current_step: int
    error: str | None = None


def after_step(goal: Goal, index: int, ok: bool, error: str | None) -> Transition:
    """Return the goal's next status and step once step `index` finished (ok or with `error`)."""
    if not ok:
        kind = goal.steps[index].kind
        reason = f"step {index} ({kind}) failed: {error or 'no reason given'}"
        return Transition("failed", index, reason)
    if index + 1 >= len(goal.steps):
        return Transition("completed", index + 1)
    return Transition("running", index + 1)
