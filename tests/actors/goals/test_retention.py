"""Goal retention: past `max_stored_goals` the oldest finished goals are pruned; open goals,
and cancelled goals whose step is still stopping its job, never are."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.goals.config import GoalsConfig
from actors.goals.errors import InvalidGoal
from actors.goals.plan import parse_goal
from actors.goals.store import GoalStore
from tests.actors.goals.test_store import SPEC


def _filled(tmp_path: Path, n: int) -> GoalStore:
    store = GoalStore(tmp_path / "goals.db")
    for i in range(n):
        store.insert(f"g{i}", parse_goal(SPEC, GoalsConfig()), now=float(i))
    return store


def test_the_oldest_finished_goals_are_pruned_down_to_the_cap_and_open_ones_stay(
    tmp_path: Path,
) -> None:
    store = _filled(tmp_path, 6)
    for goal_id in ("g1", "g2", "g4"):  # g0, g3, g5 stay open (pending)
        assert store.cancel_goal(goal_id, now=10.0)
    assert store.prune_finished(keep=4) == 2
    assert [g.id for g in store.list()] == ["g0", "g3", "g4", "g5"]
    assert store.prune_finished(keep=4) == 0  # at the cap: nothing more goes
    assert store.prune_finished(keep=1) == 1  # only g4 is finished: fewer than asked
    assert [g.id for g in store.list()] == ["g0", "g3", "g5"]
    assert store.count() == 3 and store.count(("pending",)) == 3


def test_a_cancelled_goal_whose_step_is_still_stopping_is_not_pruned(tmp_path: Path) -> None:
    store = _filled(tmp_path, 2)
    assert store.start_goal("g0", now=1.0)
    assert store.begin_step("g0", 0, now=1.0) is not None
    assert store.cancel_goal("g0", now=2.0)
    assert store.cancel_goal("g1", now=2.0)
    assert store.prune_finished(keep=0) == 1
    assert [g.id for g in store.list()] == ["g0"]
    store.step_cancelled("g0", 0, {}, now=3.0)
    assert store.prune_finished(keep=0) == 1
    assert store.get("g0") is None and store.count() == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("description", "d" * 65), ("metadata", {"model_name": "m", "dataset_path": "x" * 200})],
    ids=["description", "metadata"],
)
def test_a_goal_past_a_size_cap_is_refused_naming_the_field_and_the_key(
    field: str, value: object
) -> None:
    config = GoalsConfig(max_description_chars=64, max_metadata_bytes=128)
    with pytest.raises(InvalidGoal) as refused:
        parse_goal({**SPEC, field: value}, config)
    assert refused.value.field == field
    assert f"goals.max_{'description_chars' if field == 'description' else 'metadata_bytes'}" in (
        str(refused.value)
    )
    parse_goal({**SPEC, "description": "d" * 64}, config)  # at the cap: fine


def test_a_page_of_goals_is_read_from_sqlite_oldest_first(tmp_path: Path) -> None:
    store = _filled(tmp_path, 5)
    assert [g.id for g in store.list(limit=2)] == ["g0", "g1"]
    assert [g.id for g in store.list(limit=2, offset=3)] == ["g3", "g4"]
    assert store.list(limit=2, offset=5) == []
    assert [g.id for g in store.list(offset=4)] == ["g4"]
    assert [g.id for g in store.list(("pending",), limit=1, offset=1)] == ["g1"]
