"""Pure plan decisions: legacy goals become plans, new plans are checked, goals are ordered."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from actors.goals.config import GoalsConfig
from actors.goals.errors import InvalidGoal
from actors.goals.model import (
    DeployStep,
    EvaluateStep,
    GateStep,
    Goal,
    GoalStatus,
    Priority,
    StepState,
    TrainStep,
    UnloadStep,
)
from actors.goals.plan import (
    after_step,
    gate_verdict,
    legacy_plan,
    next_runnable,
    parse_goal,
    step_inputs,
)

CONFIG = GoalsConfig()
META = {"model_name": "tiny", "dataset_path": "/data/train.jsonl", "training_params": {"steps": 5}}


def test_a_legacy_goal_becomes_train_evaluate_gate_deploy() -> None:
    draft = parse_goal(
        {"title": "better tiny", "description": "d", "priority": "HIGH", "metadata": META}, CONFIG
    )
    assert draft.legacy
    assert draft.priority == "high"
    assert [s.kind for s in draft.steps] == ["train", "evaluate", "gate", "deploy"]
    train, evaluate, gate, deploy = draft.steps
    assert isinstance(train, TrainStep)
    assert train.job == {
        "job_type": "lora",
        "model_name": "tiny",
        "dataset_path": "/data/train.jsonl",
        "priority": "high",
        "training_params": {"steps": 5},
    }
    assert evaluate == EvaluateStep(eval_path="/data/train.jsonl")
    assert gate == GateStep(min_improvement=CONFIG.default_min_improvement)
    assert deploy == DeployStep()


def test_a_legacy_goal_takes_its_eval_set_threshold_and_job_type_from_metadata() -> None:
    meta = {
        **META,
        "eval_path": "/data/held.jsonl",
        "min_improvement": 0.05,
        "job_type": "fine_tune",
    }
    steps = legacy_plan(meta, "low", CONFIG)
    assert steps[1] == EvaluateStep(eval_path="/data/held.jsonl")
    assert steps[2] == GateStep(min_improvement=0.05)
    assert isinstance(steps[0], TrainStep) and steps[0].job["job_type"] == "fine_tune"


LEGACY_REFUSALS = [
    ({}, "metadata.model_name", ["metadata.model_name", "metadata.dataset_path"]),
    ({"model_name": "tiny"}, "metadata.dataset_path", ["metadata.dataset_path"]),
    ({"dataset_path": "/d.jsonl"}, "metadata.model_name", ["metadata.model_name"]),
    (
        {"model_name": " ", "dataset_path": "/d.jsonl"},
        "metadata.model_name",
        ["metadata.model_name"],
    ),
    ({**META, "training_params": [1]}, "metadata.training_params", ["must be an object"]),
    ({**META, "job_type": "magic"}, "metadata.job_type", ["one of lora"]),
    ({**META, "min_improvement": 2}, "metadata.min_improvement", ["[0, 1)"]),
]


@pytest.mark.parametrize(
    ("metadata", "field", "mentions"),
    LEGACY_REFUSALS,
    ids=[
        "nothing",
        "no-dataset",
        "no-model",
        "blank-model",
        "params-not-object",
        "unknown-job-type",
        "threshold-out-of-range",
    ],
)
def test_a_legacy_goal_without_enough_metadata_is_refused_saying_what_is_missing(
    metadata: dict[str, Any], field: str, mentions: list[str]
) -> None:
    with pytest.raises(InvalidGoal) as info:
        parse_goal({"title": "t", "metadata": metadata}, CONFIG)
    assert info.value.field == field
    for text in mentions:
        assert text in str(info.value)
    assert "simulat" not in str(info.value)


def test_a_legacy_refusal_names_the_plan_it_would_have_become() -> None:
    with pytest.raises(InvalidGoal, match="train → evaluate → gate → deploy"):
        parse_goal({"title": "t", "description": "no metadata at all"}, CONFIG)


def _plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"title": "t", "steps": list(steps)}


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


TRAIN = {"kind": "train", "model_name": "tiny", "dataset_path": "/d.jsonl"}
EVAL = {"kind": "evaluate", "eval_path": "/e.jsonl"}

BAD_PLANS = [
    ({"title": "t", "steps": []}, "steps"),
    ({"title": "t", "steps": "train"}, "steps"),
    (_plan({"kind": "bake"}), "steps[0].kind"),
    (_plan({"kind": "train", "model_name": "tiny"}), "steps[0].dataset_path"),
    (_plan({**TRAIN, "job_type": "x"}), "steps[0].job_type"),
    (_plan(TRAIN, {"kind": "evaluate"}), "steps[1].eval_path"),
    (_plan(TRAIN, {**EVAL, "max_tokens": 0}), "steps[1].max_tokens"),
    (_plan(TRAIN, {**EVAL, "colour": "red"}), "steps[1].colour"),
    (_plan(EVAL), "steps[0].base"),
    (_plan({**EVAL, "base": "a"}), "steps[0].candidate"),
    (_plan(TRAIN, {"kind": "gate"}), "steps[1]"),
    (_plan(TRAIN, EVAL, {"kind": "gate", "min_improvement": -0.1}), "steps[2].min_improvement"),
    (_plan(TRAIN, EVAL, {"kind": "gate", "metric": "bleu"}), "steps[2].metric"),
    (_plan({"kind": "deploy"}), "steps[0].model"),
    (_plan({"kind": "unload"}), "steps[0].model"),
    (_plan({"kind": "deploy", "model": 3}), "steps[0].model"),
    ({"steps": [TRAIN]}, "title"),
    ({"title": "t", "priority": "urgent", "steps": [TRAIN]}, "priority"),
    ({"title": "t", "metadata": [], "steps": [TRAIN]}, "metadata"),
    ([TRAIN], "goal"),
    # Names and text a client chooses (actors.names): issue 13, finding 8.
    ({"title": "sur\ud800", "steps": [TRAIN]}, "title"),
    ({"title": "t" * 257, "steps": [TRAIN]}, "title"),
    ({"title": "line\nbreak", "steps": [TRAIN]}, "title"),
    ({"title": "t", "description": "\udc80", "steps": [TRAIN]}, "description"),
    (_plan({**TRAIN, "output_name": "a\x00b"}), "steps[0].output_name"),
    (_plan({**TRAIN, "model_name": "x/y"}), "steps[0].model_name"),
    (_plan({**TRAIN, "dataset_path": "d/" * 2500}), "steps[0].dataset_path"),
    (_plan({"kind": "deploy", "model": "sur\ud800"}), "steps[0].model"),
    ({"title": "t", "metadata": {**META, "output_name": "o" * 200}}, "metadata.output_name"),
    ({"title": "t", "metadata": {**META, "model_name": "\ud800"}}, "metadata.model_name"),
    ({"title": "t", "metadata": {"x": _nested(40)}, "steps": [TRAIN]}, "metadata"),
]


@pytest.mark.parametrize(
    ("spec", "field"),
    BAD_PLANS,
    ids=[
        "empty-steps",
        "steps-not-a-list",
        "unknown-kind",
        "train-without-dataset",
        "train-bad-job-type",
        "evaluate-without-set",
        "evaluate-zero-tokens",
        "evaluate-unknown-field",
        "evaluate-without-base",
        "evaluate-without-candidate",
        "gate-before-evaluate",
        "gate-negative-threshold",
        "gate-unknown-metric",
        "deploy-nothing",
        "unload-nothing",
        "deploy-model-not-a-string",
        "no-title",
        "unknown-priority",
        "metadata-not-an-object",
        "not-an-object",
        "title-lone-surrogate",
        "title-257-characters",
        "title-newline",
        "description-lone-surrogate",
        "train-output-nul",
        "train-model-slash",
        "train-dataset-path-5000",
        "deploy-model-lone-surrogate",
        "legacy-output-200-bytes",
        "legacy-model-lone-surrogate",
        "metadata-40-deep",
    ],
)
def test_a_bad_plan_is_refused_naming_the_bad_field(spec: Any, field: str) -> None:
    with pytest.raises(InvalidGoal) as info:
        parse_goal(spec, CONFIG)
    assert info.value.field == field


def test_a_plan_longer_than_the_limit_is_refused() -> None:
    config = replace(CONFIG, max_plan_steps=2)
    with pytest.raises(InvalidGoal, match="at most 2 steps"):
        parse_goal(_plan(TRAIN, TRAIN, TRAIN), config)


def test_a_new_style_plan_keeps_its_steps_and_defaults() -> None:
    draft = parse_goal(
        _plan(
            TRAIN,
            {**EVAL, "max_tokens": 100},
            {"kind": "gate", "min_improvement": 0.2, "metric": "perplexity"},
            {"kind": "deploy"},
            {"kind": "unload", "model": "tiny"},
        ),
        CONFIG,
    )
    assert not draft.legacy
    assert draft.steps == (
        TrainStep(
            job={
                "model_name": "tiny",
                "dataset_path": "/d.jsonl",
                "job_type": "lora",
                "priority": "medium",
            }
        ),
        EvaluateStep(eval_path="/e.jsonl", max_tokens=100),
        GateStep(min_improvement=0.2, metric="perplexity"),
        DeployStep(),
        UnloadStep(model="tiny"),
    )


def test_a_plan_without_training_may_evaluate_and_deploy_named_models() -> None:
    draft = parse_goal(
        _plan(
            {**EVAL, "base": "a", "candidate": "b"},
            {"kind": "gate", "min_improvement": 0},
            {"kind": "deploy", "model": "b"},
        ),
        CONFIG,
    )
    assert [s.kind for s in draft.steps] == ["evaluate", "gate", "deploy"]


# -- ordering ---------------------------------------------------------------------------------


def _goal(seq: int, priority: Priority, status: GoalStatus = "pending") -> Goal:
    return Goal(
        id=f"g{seq}",
        seq=seq,
        title=f"goal {seq}",
        description="",
        priority=priority,
        steps=(DeployStep(model="m"),),
        states=(StepState(0, "deploy"),),
        status=status,
    )


ORDERING = [
    ([_goal(1, "low"), _goal(2, "critical"), _goal(3, "medium")], 10, ["g2", "g3", "g1"]),
    ([_goal(1, "high"), _goal(2, "high"), _goal(3, "high")], 10, ["g1", "g2", "g3"]),
    ([_goal(3, "medium"), _goal(1, "medium"), _goal(2, "critical")], 2, ["g2", "g1"]),
    ([_goal(1, "low", "running"), _goal(2, "critical"), _goal(3, "high")], 2, ["g2"]),
    ([_goal(1, "low", "running"), _goal(2, "low", "running"), _goal(3, "high")], 2, []),
    ([_goal(1, "low", "completed"), _goal(2, "low", "failed"), _goal(3, "low")], 1, ["g3"]),
    ([_goal(1, "high", "cancelled"), _goal(2, "low")], 1, ["g2"]),
    ([], 3, []),
]


@pytest.mark.parametrize(
    ("goals", "max_active", "expected"),
    ORDERING,
    ids=[
        "priority-first",
        "first-come-within-a-priority",
        "priority-then-age-up-to-the-limit",
        "running-goals-take-room",
        "no-room-left",
        "finished-goals-take-no-room",
        "cancelled-goals-never-start",
        "nothing-to-run",
    ],
)
def test_goals_run_by_priority_then_age_within_max_active(
    goals: list[Goal], max_active: int, expected: list[str]
) -> None:
    assert [g.id for g in next_runnable(goals, max_active)] == expected


# -- between steps ----------------------------------------------------------------------------


def _legacy_goal(states: list[StepState]) -> Goal:
    steps = legacy_plan(META, "medium", CONFIG)
    return Goal(
        id="g",
        seq=1,
        title="t",
        description="",
        priority="medium",
        steps=steps,
        states=tuple(states),
        status="running",
    )


def test_later_steps_see_the_trained_candidate_and_the_latest_evaluation() -> None:
    evaluation = {"base": {"loss": 2.0}, "candidate": {"loss": 1.5}}
    goal = _legacy_goal(
        [
            StepState(0, "train", "completed", result={"result_model": "tiny@job1"}),
            StepState(1, "evaluate", "completed", result=evaluation),
            StepState(2, "gate", "running"),
            StepState(3, "deploy"),
        ]
    )
    assert step_inputs(goal.steps, goal.states, 1).base == "tiny"
    assert step_inputs(goal.steps, goal.states, 1).candidate == "tiny@job1"
    assert step_inputs(goal.steps, goal.states, 2).evaluation == evaluation
    assert step_inputs(goal.steps, goal.states, 3).candidate == "tiny@job1"


GATES = [
    (0.01, 2.0, 1.5, True),
    (0.01, 2.0, 1.99, False),
    (0.0, 2.0, 2.0, False),
    (0.0, 2.0, 1.999, True),
    (0.1, 2.0, 2.5, False),
    (0.0, float("nan"), 1.0, False),
]


@pytest.mark.parametrize(
    ("threshold", "base", "candidate", "passes"),
    GATES,
    ids=[
        "clear-win",
        "too-small-a-win",
        "identical-never-passes",
        "any-win-with-zero-threshold",
        "worse",
        "nan-loss",
    ],
)
def test_a_gate_passes_only_a_candidate_that_beats_the_base_by_its_threshold(
    threshold: float, base: float, candidate: float, passes: bool
) -> None:
    verdict = gate_verdict(
        GateStep(min_improvement=threshold),
        {"base": {"loss": base}, "candidate": {"loss": candidate}},
    )
    assert verdict.passed is passes
    assert "loss" in verdict.reason


def test_a_gate_without_an_evaluation_fails() -> None:
    assert not gate_verdict(GateStep(min_improvement=0.0), None).passed


def _fresh_states() -> tuple[StepState, ...]:
    return (
        StepState(0, "train"),
        StepState(1, "evaluate"),
        StepState(2, "gate"),
        StepState(3, "deploy"),
    )


def test_a_failed_step_fails_the_goal_with_the_steps_reason() -> None:
    goal = _legacy_goal(list(_fresh_states()))
    transition = after_step(goal, 0, ok=False, error="learning job abc failed: NaN loss")
    assert transition.status == "failed"
    assert transition.error == "step 0 (train) failed: learning job abc failed: NaN loss"


def test_a_finished_last_step_completes_the_goal_and_others_move_it_on() -> None:
    goal = _legacy_goal(list(_fresh_states()))
    assert after_step(goal, 1, ok=True, error=None).current_step == 2
    assert after_step(goal, 1, ok=True, error=None).status == "running"
    assert after_step(goal, 3, ok=True, error=None).status == "completed"
