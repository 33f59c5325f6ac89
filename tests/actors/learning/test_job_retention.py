"""Job retention: past `max_stored_jobs` the oldest finished jobs (and their loss histories)
are pruned; queued and running ones never are."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from actors.learning.config import LearningConfig
from actors.learning.jobs import JobStore

SPEC = {"job_type": "lora", "model_name": "m", "dataset_path": "/d.jsonl", "priority": 0}


def _filled(tmp_path: Path, n: int) -> JobStore:
    store = JobStore(tmp_path / "jobs.db")
    for i in range(n):
        store.insert(f"j{i}", SPEC, output_name=f"o{i}", total_steps=10, memory_mb=1.0, now=i)
    return store


def test_the_oldest_finished_jobs_are_pruned_with_their_losses_and_open_ones_stay(
    tmp_path: Path,
) -> None:
    store = _filled(tmp_path, 5)
    store.mark_running("j0", now=1.0)
    store.progress("j1", 2, [(1, 0.5), (2, 0.4)], now=2.0)
    for job_id, status in (("j1", "completed"), ("j2", "failed"), ("j4", "cancelled")):
        assert store.finish(job_id, status, now=3.0)
    assert store.prune_finished(keep=3) == 2
    assert [j.id for j in store.jobs()] == ["j0", "j3", "j4"]
    with sqlite3.connect(store.path) as db:  # a loss history goes with its job
        assert db.execute("SELECT COUNT(*) FROM losses").fetchone()[0] == 0
    assert store.prune_finished(keep=0) == 1  # only j4 is finished
    assert [j.id for j in store.jobs()] == ["j0", "j3"]
    assert store.count() == 2 and store.count(("queued",)) == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_queued_jobs", 0), ("max_stored_jobs", 0), ("max_stored_jobs", 2_000_000)],
    ids=["no-queue", "no-store", "huge-store"],
)
def test_a_job_limit_out_of_range_is_refused_naming_its_key(key: str, value: int) -> None:
    with pytest.raises(ValueError, match=key):
        LearningConfig(**{key: value})  # type: ignore[arg-type]


def test_a_page_of_jobs_is_read_from_sqlite_oldest_first(tmp_path: Path) -> None:
    store = _filled(tmp_path, 5)
    assert [j.id for j in store.jobs(limit=2)] == ["j0", "j1"]
    assert [j.id for j in store.jobs(limit=2, offset=3)] == ["j3", "j4"]
    assert store.jobs(limit=2, offset=5) == []
    assert [j.id for j in store.jobs(("queued",), offset=4)] == ["j4"]
