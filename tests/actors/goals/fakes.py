"""Small real fakes for goal tests: a learning service over SQLite, recording step executors.

`SqliteLearning` keeps its jobs in a SQLite file, so a test and a child process it kills and
restarts see the same jobs (":memory:" for one process). Jobs only move when the test says.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.goals.executors import StepContext, StepOutcome
from actors.goals.model import Step


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        pause.wait(0.01)


class SqliteLearning:
    """A learning service whose jobs complete, fail or progress only when told."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, "
            "spec TEXT, output_name TEXT, status TEXT, progress REAL, error TEXT, "
            "created_at REAL, cancels INTEGER DEFAULT 0)"
        )
        self.refuse: str | None = None  # set to make submit raise with this message

    def submit(self, spec: dict[str, Any]) -> str:
        if self.refuse:
            raise ValueError(self.refuse)
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, spec, output_name, status, progress, created_at) "
                "VALUES (?, ?, ?, 'queued', 0, ?)",
                (job_id, json.dumps(spec), spec.get("output_name"), time.time()),
            )
        return job_id

    def get(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute(
                "SELECT id, spec, output_name, status, progress, error, created_at FROM jobs "
                "WHERE id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise KeyError(f"no learning job {job_id}")
        return self._job(row)

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, spec, output_name, status, progress, error, created_at FROM jobs "
                "ORDER BY seq"
            ).fetchall()
        return [self._job(r) for r in rows]

    def cancel(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET cancels = cancels + 1, status = CASE WHEN status IN "
                "('queued', 'running') THEN 'cancelled' ELSE status END WHERE id = ?",
                (job_id,),
            )
        return self.get(job_id)

    # -- what tests do --------------------------------------------------------------------------

    def set(
        self, job_id: str, status: str, progress: float = 0.0, error: str | None = None
    ) -> None:
        """Move a job to `status`."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, progress = ?, error = ? WHERE id = ?",
                (status, progress, error, job_id),
            )

    def jobs(self) -> list[dict[str, Any]]:
        """Return every job with its spec and how often it was cancelled."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, spec, status, cancels FROM jobs ORDER BY seq"
            ).fetchall()
        return [
            {"job_id": r[0], "spec": json.loads(r[1]), "status": r[2], "cancels": r[3]}
            for r in rows
        ]

    @staticmethod
    def _job(row: tuple[Any, ...]) -> dict[str, Any]:
        return {
            "job_id": row[0],
            "output_name": row[2],
            "status": row[3],
            "progress": row[4],
            "error": row[5],
            "created_at": row[6],
        }


class ScriptedExecutor:
    """An executor that records each run, may hold until released, then returns its outcome."""

    def __init__(self, outcome: Callable[[Step, StepContext], StepOutcome] | StepOutcome) -> None:
        self._outcome = outcome
        self.runs: list[StepContext] = []
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()

    def hold(self) -> None:
        """Make later runs wait for `release` (or an interrupt)."""
        self.release.clear()

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        with self._lock:
            self.runs.append(ctx)
        while not self.release.wait(0.01):
            if ctx.interrupt.is_set():
                status = "cancelled" if ctx.interrupt.reason == "cancel" else "interrupted"
                return StepOutcome(status)  # type: ignore[arg-type]
        if isinstance(self._outcome, StepOutcome):
            return self._outcome
        return self._outcome(step, ctx)


def evaluation(base_loss: float, candidate_loss: float) -> StepOutcome:
    """Return an evaluate outcome with these losses."""
    return StepOutcome.done(
        base={"model": "base", "loss": base_loss},
        candidate={"model": "candidate", "loss": candidate_loss},
    )
