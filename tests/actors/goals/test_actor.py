"""The GoalActor over a fake learning service and scripted evaluations: whole plans, ordering,
max_active, failures with their reasons, cancel cascades and resuming after a stop."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.errors import ModelAlreadyLoaded
from actors.goals import metrics
from actors.goals.actor import GoalActor
from actors.goals.config import GoalsConfig
from actors.goals.errors import GoalNotFound, InvalidGoal
from actors.goals.executors import StepExecutor
from actors.goals.model import StepKind
from tests.actors.goals.fakes import ScriptedExecutor, SqliteLearning, evaluation, wait_until


def legacy(title: str = "better tiny", priority: str = "medium", **meta: Any) -> dict[str, Any]:
    """Return a legacy goal spec."""
    metadata = {
        "model_name": "tiny",
        "dataset_path": "/data/train.jsonl",
        "training_params": {"steps": 3},
        **meta,
    }
    return {"title": title, "description": "", "priority": priority, "metadata": metadata}


@dataclass
class Rig:
    """A started GoalActor and everything it talks to."""

    config: GoalsConfig
    learning: SqliteLearning
    evaluate: ScriptedExecutor
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    refs: list[pykka.ActorRef[Any]] = field(default_factory=list)

    def start(self, **executors: StepExecutor) -> Any:
        """Start a GoalActor on the rig's store; return its proxy."""
        chosen: dict[StepKind, StepExecutor] = {"evaluate": self.evaluate, **executors}  # type: ignore[dict-item]
        ref = GoalActor.start(
            self.config,
            learning=self.learning,
            resolve_model=lambda name: Path(f"/models/{name}.gguf"),
            load=self.load,
            unload=self.unloaded.append,
            executors=chosen,
        )
        self.refs.append(ref)
        return ref.proxy()

    def load(self, name: str) -> None:
        if name in self.loaded:
            raise ModelAlreadyLoaded(f"model {name!r} is already loaded")
        self.loaded.append(name)

    def job_of(self, goal: dict[str, Any]) -> str:
        """Wait until the goal's train step has attached a job; return the job id."""
        goal_id = goal["goal_id"]
        proxy = self.refs[-1].proxy()
        wait_until(
            lambda: proxy.get(goal_id).get()["steps"][0]["state"]["handle"] is not None,
            what=f"goal {goal_id} to submit its job",
        )
        handle: str = proxy.get(goal_id).get()["steps"][0]["state"]["handle"]
        return handle


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    config = GoalsConfig(goal_store=str(tmp_path / "goals.db"), poll_interval_s=0.02)
    made = Rig(config, SqliteLearning(), ScriptedExecutor(evaluation(2.0, 1.5)))
    yield made
    for ref in made.refs:
        ref.stop()


def status_of(proxy: Any, goal_id: str) -> str:
    status: str = proxy.get(goal_id).get()["status"]
    return status


def wait_status(proxy: Any, goal_id: str, status: str) -> dict[str, Any]:
    wait_until(lambda: status_of(proxy, goal_id) == status, what=f"goal {goal_id} {status}")
    goal: dict[str, Any] = proxy.get(goal_id).get()
    return goal


def test_a_legacy_goal_trains_evaluates_gates_and_deploys_the_candidate(rig: Rig) -> None:
    goals = rig.start()
    completed_before = metrics.goals_completed_total._value.get()
    goal = goals.create(legacy()).get()
    assert goal["legacy"] and [s["kind"] for s in goal["steps"]] == [
        "train",
        "evaluate",
        "gate",
        "deploy",
    ]
    job_id = rig.job_of(goal)
    job = rig.learning.jobs()[0]
    assert job["spec"]["model_name"] == "tiny" and job["spec"]["job_type"] == "lora"
    assert job["spec"]["training_params"] == {"steps": 3}
    rig.learning.set(job_id, "running", progress=0.5)
    wait_until(lambda: goals.get(goal["goal_id"]).get()["progress"] == 0.125, what="progress")
    rig.learning.set(job_id, "completed", progress=1.0)

    done = wait_status(goals, goal["goal_id"], "completed")
    candidate = f"tiny@goal-{goal['goal_id']}-0"
    assert rig.loaded == [candidate]
    states = [s["state"] for s in done["steps"]]
    assert [s["status"] for s in states] == ["completed"] * 4
    assert states[0]["result"]["result_model"] == candidate
    assert states[2]["result"]["passed"] is True
    assert states[2]["result"]["improvement"] == pytest.approx(0.25)
    assert states[3]["result"] == {"model": candidate, "already_loaded": False}
    assert rig.evaluate.runs[0].inputs.base == "tiny"
    assert rig.evaluate.runs[0].inputs.candidate == candidate
    assert done["progress"] == 1.0
    assert metrics.goals_completed_total._value.get() == completed_before + 1


def test_goals_start_by_priority_then_age_and_at_most_max_active_run(rig: Rig) -> None:
    rig.config = replace(rig.config, max_active_goals=1)
    goals = rig.start()
    first = goals.create(legacy("first", "low")).get()
    rig.job_of(first)
    later = [
        goals.create(legacy(title, priority)).get()
        for title, priority in (("low", "low"), ("critical", "critical"), ("high", "high"))
    ]
    assert [status_of(goals, g["goal_id"]) for g in later] == ["pending"] * 3
    assert metrics.goals_active_total._value.get() == 1
    assert metrics.goals_pending._value.get() == 3

    started: list[str] = []
    for _ in range(4):
        job = rig.learning.jobs()[-1]

        def holder(job_id: str = job["job_id"]) -> list[dict[str, Any]]:
            return [
                g for g in goals.list_goals().get() if g["steps"][0]["state"]["handle"] == job_id
            ]

        wait_until(lambda: bool(holder()), what="the job to be attached")  # submit, then attach
        goal = holder()[0]
        started.append(goal["title"])
        running = [g for g in goals.list_goals().get() if g["status"] == "running"]
        assert len(running) == 1
        rig.learning.set(job["job_id"], "completed", 1.0)
        wait_status(goals, goal["goal_id"], "completed")
        if len(started) < 4:
            wait_until(lambda: len(rig.learning.jobs()) > len(started), what="the next job")
    assert started == ["first", "critical", "high", "low"]


def test_a_failed_learning_job_fails_the_goal_with_its_reason(rig: Rig) -> None:
    goals = rig.start()
    goal = goals.create(legacy()).get()
    job_id = rig.job_of(goal)
    rig.learning.set(job_id, "failed", error="loss became NaN at step 2")
    failed = wait_status(goals, goal["goal_id"], "failed")
    assert failed["error"] == (
        f"step 0 (train) failed: learning job {job_id} failed: loss became NaN at step 2"
    )
    assert [s["state"]["status"] for s in failed["steps"]] == [
        "failed",
        "pending",
        "pending",
        "pending",
    ]
    assert rig.evaluate.runs == [] and rig.loaded == []


def test_a_refused_learning_job_fails_the_goal_with_the_refusal(rig: Rig) -> None:
    rig.learning.refuse = "dataset_path: /data/train.jsonl line 3: field 'text' must be a string"
    goals = rig.start()
    goal = goals.create(legacy()).get()
    failed = wait_status(goals, goal["goal_id"], "failed")
    assert failed["error"].startswith("step 0 (train) failed: the learning job was refused:")
    assert "line 3: field 'text'" in failed["error"]


def test_a_candidate_that_does_not_beat_the_base_stops_at_the_gate(rig: Rig) -> None:
    rig.evaluate = ScriptedExecutor(evaluation(2.0, 2.0))
    goals = rig.start()
    goal = goals.create(legacy(min_improvement=0.01)).get()
    rig.learning.set(rig.job_of(goal), "completed", 1.0)
    failed = wait_status(goals, goal["goal_id"], "failed")
    assert failed["error"].startswith(
        "step 2 (gate) failed: gate not passed: candidate loss 2.0000"
    )
    assert failed["steps"][2]["state"]["result"]["passed"] is False
    assert rig.loaded == []


def test_cancelling_a_running_goal_cancels_its_learning_job(rig: Rig) -> None:
    goals = rig.start()
    cancelled_before = metrics.goals_cancelled_total._value.get()
    goal = goals.create(legacy()).get()
    job_id = rig.job_of(goal)
    rig.learning.set(job_id, "running", 0.2)
    answer = goals.cancel(goal["goal_id"]).get()
    assert answer["status"] == "cancelled"
    wait_until(lambda: rig.learning.jobs()[0]["status"] == "cancelled", what="job cancelled")
    wait_until(
        lambda: goals.get(goal["goal_id"]).get()["steps"][0]["state"]["status"] == "cancelled",
        what="train step cancelled",
    )
    after = goals.get(goal["goal_id"]).get()
    assert [s["state"]["status"] for s in after["steps"]] == ["cancelled"] * 4
    assert after["steps"][0]["state"]["result"] == {"job_id": job_id}
    assert rig.learning.jobs()[0]["cancels"] == 1
    assert metrics.goals_cancelled_total._value.get() == cancelled_before + 1
    assert goals.cancel(goal["goal_id"]).get()["status"] == "cancelled"  # idempotent


def test_cancelling_a_pending_goal_never_submits_a_job(rig: Rig) -> None:
    rig.config = replace(rig.config, max_active_goals=1)
    goals = rig.start()
    first = goals.create(legacy("first")).get()
    rig.job_of(first)
    waiting = goals.create(legacy("waiting")).get()
    goals.cancel(waiting["goal_id"]).get()
    rig.learning.set(rig.learning.jobs()[0]["job_id"], "completed", 1.0)
    wait_status(goals, first["goal_id"], "completed")
    assert len(rig.learning.jobs()) == 1
    assert status_of(goals, waiting["goal_id"]) == "cancelled"


def test_a_finished_goal_is_not_cancelled(rig: Rig) -> None:
    goals = rig.start()
    goal = goals.create({"title": "deploy", "steps": [{"kind": "deploy", "model": "m"}]}).get()
    wait_status(goals, goal["goal_id"], "completed")
    assert goals.cancel(goal["goal_id"]).get()["status"] == "completed"


def test_a_stopped_actor_resumes_the_running_step_without_resubmitting(rig: Rig) -> None:
    goals = rig.start()
    goal = goals.create(legacy()).get()
    job_id = rig.job_of(goal)
    rig.refs.pop().stop()  # stop_all: the step lets go but stays running

    goals = rig.start()
    resumed = goals.get(goal["goal_id"]).get()
    assert resumed["status"] == "running"
    assert resumed["steps"][0]["state"]["attempts"] == 2
    assert resumed["steps"][0]["state"]["handle"] == job_id
    rig.learning.set(job_id, "completed", 1.0)
    wait_status(goals, goal["goal_id"], "completed")
    assert len(rig.learning.jobs()) == 1
    assert rig.learning.jobs()[0]["cancels"] == 0


def test_an_already_loaded_candidate_counts_as_deployed_and_unload_is_recorded(rig: Rig) -> None:
    rig.loaded.append("m")
    goals = rig.start()
    goal = goals.create(
        {
            "title": "swap",
            "priority": "high",
            "steps": [{"kind": "deploy", "model": "m"}, {"kind": "unload", "model": "old"}],
        }
    ).get()
    done = wait_status(goals, goal["goal_id"], "completed")
    assert done["steps"][0]["state"]["result"] == {"model": "m", "already_loaded": True}
    assert rig.unloaded == ["old"]


def test_an_unknown_goal_is_not_found_and_a_bad_one_is_refused(rig: Rig) -> None:
    goals = rig.start()
    with pytest.raises(GoalNotFound):
        goals.get("nope").get()
    with pytest.raises(GoalNotFound):
        goals.cancel("nope").get()
    with pytest.raises(InvalidGoal) as info:
        goals.create({"title": "x", "metadata": {"model_name": "tiny"}}).get()
    assert info.value.field == "metadata.dataset_path"
    assert goals.list_goals().get() == []


def test_an_evaluation_set_outside_the_allowed_dirs_is_refused_at_creation(tmp_path: Path) -> None:
    config = GoalsConfig(goal_store=str(tmp_path / "goals.db"))
    ref = GoalActor.start(
        config,
        learning=SqliteLearning(),
        resolve_model=lambda name: Path(name),
        load=lambda name: None,
        unload=lambda name: None,
        eval_dirs=[str(tmp_path / "data")],
    )
    try:
        with pytest.raises(InvalidGoal) as info:
            ref.proxy().create(legacy(dataset_path="/etc/passwd")).get()
        assert info.value.field == "metadata.dataset_path"
        assert "outside the evaluation directories" in str(info.value)
    finally:
        ref.stop()
