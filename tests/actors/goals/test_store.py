"""The goal store: goals, steps, results and progress survive reopening; moves are guarded."""

from __future__ import annotations

from pathlib import Path

from actors.goals.config import GoalsConfig
from actors.goals.plan import Transition, parse_goal
from actors.goals.store import GoalStore

SPEC = {
    "title": "better tiny",
    "description": "legacy",
    "priority": "high",
    "metadata": {"model_name": "tiny", "dataset_path": "/d.jsonl", "training_params": {"steps": 3}},
}


def _store(tmp_path: Path) -> GoalStore:
    return GoalStore(tmp_path / "goals" / "goals.db")


def test_a_stored_goal_reads_back_identically_after_reopening(tmp_path: Path) -> None:
    draft = parse_goal(SPEC, GoalsConfig())
    store = _store(tmp_path)
    goal = store.insert("g1", draft, now=100.0)
    store.close()
    again = _store(tmp_path).get("g1")
    assert again == goal
    assert again is not None
    assert again.steps == draft.steps
    assert again.status == "pending"
    assert [s.status for s in again.states] == ["pending"] * 4
    assert again.metadata == SPEC["metadata"]


def test_a_step_records_its_handle_progress_and_result_durably(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.insert("g1", parse_goal(SPEC, GoalsConfig()), now=1.0)
    assert store.start_goal("g1", now=2.0)
    state = store.begin_step("g1", 0, now=3.0)
    assert state is not None and state.attempts == 1 and state.handle is None
    store.attach("g1", 0, "job-1")
    store.set_progress("g1", 0, 0.5)
    store.close()

    store = _store(tmp_path)
    resumed = store.begin_step("g1", 0, now=9.0)
    assert resumed is not None
    assert (resumed.handle, resumed.attempts, resumed.started_at) == ("job-1", 2, 3.0)
    assert resumed.progress == 0.5
    assert store.finish_step(
        "g1",
        0,
        ok=True,
        result={"result_model": "tiny@job-1"},
        error=None,
        transition=Transition("running", 1),
        now=10.0,
    )
    goal = store.get("g1")
    assert goal is not None
    assert goal.current_step == 1
    assert goal.states[0].status == "completed"
    assert goal.states[0].result == {"result_model": "tiny@job-1"}
    assert goal.states[0].progress == 1.0


def test_a_completed_step_cannot_be_started_again(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.insert("g1", parse_goal(SPEC, GoalsConfig()), now=1.0)
    store.start_goal("g1", now=1.0)
    store.begin_step("g1", 0, now=1.0)
    store.finish_step(
        "g1", 0, ok=True, result={}, error=None, transition=Transition("running", 1), now=2.0
    )
    assert store.begin_step("g1", 0, now=3.0) is None
    assert store.begin_step("g1", 2, now=3.0) is None  # not the current step either
    assert store.begin_step("g1", 1, now=3.0) is not None


def test_a_cancelled_goal_ignores_the_late_finish_of_its_running_step(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.insert("g1", parse_goal(SPEC, GoalsConfig()), now=1.0)
    store.start_goal("g1", now=1.0)
    store.begin_step("g1", 0, now=1.0)
    assert store.cancel_goal("g1", now=2.0)
    assert not store.cancel_goal("g1", now=2.5)
    assert not store.finish_step(
        "g1", 0, ok=True, result={}, error=None, transition=Transition("running", 1), now=3.0
    )
    store.step_cancelled("g1", 0, {"job_cancelled": True}, now=3.0)
    goal = store.get("g1")
    assert goal is not None
    assert goal.status == "cancelled"
    assert [s.status for s in goal.states] == ["cancelled"] * 4
    assert goal.states[0].result == {"job_cancelled": True}


def test_a_failed_step_fails_its_goal_in_the_same_write(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.insert("g1", parse_goal(SPEC, GoalsConfig()), now=1.0)
    store.start_goal("g1", now=1.0)
    store.begin_step("g1", 0, now=1.0)
    store.finish_step(
        "g1",
        0,
        ok=False,
        result={},
        error="boom",
        transition=Transition("failed", 0, "step 0 (train) failed: boom"),
        now=2.0,
    )
    goal = store.get("g1")
    assert goal is not None
    assert (goal.status, goal.error, goal.finished_at) == (
        "failed",
        "step 0 (train) failed: boom",
        2.0,
    )
    assert goal.states[0].error == "boom"


def test_listing_filters_by_status_in_insertion_order(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(3):
        store.insert(f"g{i}", parse_goal(SPEC, GoalsConfig()), now=float(i))
    store.start_goal("g1", now=5.0)
    assert [g.id for g in store.list()] == ["g0", "g1", "g2"]
    assert [g.id for g in store.list(("running",))] == ["g1"]
    assert [g.seq for g in store.list()] == sorted(g.seq for g in store.list())
