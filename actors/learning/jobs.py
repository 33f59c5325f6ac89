"""The job store: every learning job, its progress, losses and checkpoint, in SQLite (WAL).

Each process opens its own store, one connection guarded by a lock: the node's actor, and
each job's process writing its own row. Writes are small transactions (a progress row, a
checkpoint step), so the processes take turns on SQLite's write lock (waiting up to 30 s), and
WAL lets readers (the actor's `get`, the CLI) look in while a job writes. A job's row is the truth about it; the actor's memory only holds what is
running now, so a restart rebuilds everything from here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.errors import Overloaded
from actors.learning.errors import LearningError

Status = Literal["queued", "running", "cancelling", "completed", "failed", "cancelled"]
FINAL: tuple[str, ...] = ("completed", "failed", "cancelled")

JOBS_RETRY_AFTER_S = 60.0
"""Retry hint of TooManyJobs: a job trains for minutes, so the queue moves no faster."""


class TooManyJobs(Overloaded):
    """`learning.max_queued_jobs` jobs are waiting to run: retry when the queue has moved."""

    code = "too_many_jobs"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=JOBS_RETRY_AFTER_S)


class JobStoreFull(LearningError):
    """`learning.max_stored_jobs` jobs are stored and none is finished, so none can be pruned."""

    code = "job_store_full"


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT UNIQUE NOT NULL,
    job_type        TEXT NOT NULL,
    model_name      TEXT NOT NULL,
    dataset_path    TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    spec            TEXT NOT NULL,
    output_name     TEXT NOT NULL,
    status          TEXT NOT NULL,
    step            INTEGER NOT NULL DEFAULT 0,
    total_steps     INTEGER NOT NULL,
    memory_mb       REAL NOT NULL DEFAULT 0,
    metrics         TEXT NOT NULL DEFAULT '{}',
    detail          TEXT,
    error           TEXT,
    output_path     TEXT,
    checkpoint_step INTEGER NOT NULL DEFAULT 0,
    checkpoint_path TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    updated_at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS losses (
    job_id  TEXT NOT NULL,
    step    INTEGER NOT NULL,
    loss    REAL NOT NULL,
    PRIMARY KEY (job_id, step)
);
"""

_COLUMNS = [
    "seq",
    "id",
    "job_type",
    "model_name",
    "dataset_path",
    "priority",
    "spec",
    "output_name",
    "status",
    "step",
    "total_steps",
    "memory_mb",
    "metrics",
    "detail",
    "error",
    "output_path",
    "checkpoint_step",
    "checkpoint_path",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
    "updated_at",
]


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job's row."""

    seq: int
    id: str
    job_type: str
    model_name: str
    dataset_path: str
    priority: int
    spec: dict[str, Any]
    output_name: str
    status: str
    step: int
    total_steps: int
    memory_mb: float
    metrics: dict[str, Any]
    detail: str | None
    error: str | None
    output_path: str | None
    checkpoint_step: int
    checkpoint_path: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return the job as the API reports it."""
        return {
            "job_id": self.id,
            "job_type": self.job_type,
            "model_name": self.model_name,
            "dataset_path": self.dataset_path,
            "priority": self.priority,
            "training_params": self.spec.get("training_params", {}),
            "output_name": self.output_name,
            "replace": bool(self.spec.get("replace", False)),
            "status": self.status,
            "step": self.step,
            "total_steps": self.total_steps,
            "progress": self.step / self.total_steps if self.total_steps else 0.0,
            "loss": self.loss_history[-1][1] if self.loss_history else None,
            "loss_history": [[s, v] for s, v in self.loss_history],
            "metrics": self.metrics,
            "memory_mb": self.memory_mb,
            "detail": self.detail,
            "error": self.error,
            "output_path": self.output_path,
            "checkpoint_step": self.checkpoint_step,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


def queue_order(jobs: Iterable[JobRecord]) -> list[JobRecord]:
    """Order queued jobs: higher priority first, then older first (then submission order)."""
    return sorted(jobs, key=lambda j: (-j.priority, j.created_at, j.seq))


class JobStore:
    """The SQLite file holding learning jobs."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self._lock = threading.Lock()
        self._db = sqlite3.connect(p, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # -- reads --------------------------------------------------------------------------------

    def _record(self, row: tuple[Any, ...], history: bool) -> JobRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["spec"] = json.loads(values["spec"])
        values["metrics"] = json.loads(values["metrics"])
        losses: list[tuple[int, float]] = []
        if history:
            losses = [
                (int(s), float(v))
                for s, v in self._db.execute(
                    "SELECT step, loss FROM losses WHERE job_id = ? ORDER BY step", (values["id"],)
                )
            ]
        return JobRecord(**values, loss_history=losses)

    def get(self, job_id: str, *, history: bool = True) -> JobRecord | None:
        """Return one job (with its loss history), or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            return None if row is None else self._record(row, history)

    def jobs(
        self,
        statuses: tuple[str, ...] = (),
        *,
        history: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Return jobs (optionally only those in `statuses`), oldest first: at most `limit`
        (None: all) from position `offset`, read from SQLite as such."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: tuple[str | int, ...] = ()
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = statuses
        args = (*args, -1 if limit is None else limit, offset)  # LIMIT -1: no limit
        with self._lock:
            rows = self._db.execute(query + " ORDER BY seq LIMIT ? OFFSET ?", args).fetchall()
            return [self._record(r, history) for r in rows]

    def count(self, statuses: tuple[str, ...] = ()) -> int:
        """Return how many jobs are stored (of the given statuses, if any)."""
        where = f" WHERE status IN ({', '.join('?' * len(statuses))})" if statuses else ""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM jobs" + where, statuses).fetchone()
        return int(row[0])

    # -- writes -------------------------------------------------------------------------------

    def prune_finished(self, keep: int) -> int:
        """Delete the oldest finished jobs (and their losses) until at most `keep` remain;
        return how many went. Jobs not finished are never pruned, so fewer may go."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                total = int(self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
                ids = [
                    r[0]
                    for r in self._db.execute(
                        "SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') "
                        "ORDER BY seq LIMIT ?",
                        (max(0, total - keep),),
                    )
                ]
                for chunk in range(0, len(ids), 500):  # under SQLite's bound on parameters
                    part = ids[chunk : chunk + 500]
                    marks = ", ".join("?" * len(part))
                    self._db.execute(f"DELETE FROM losses WHERE job_id IN ({marks})", part)
                    self._db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", part)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return len(ids)


    def insert(
        self,
        job_id: str,
        spec: dict[str, Any],
        *,
        output_name: str,
        total_steps: int,
        memory_mb: float,
        now: float,
    ) -> None:
        """Add a queued job."""
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, job_type, model_name, dataset_path, priority, spec, "
                "output_name, status, total_steps, memory_mb, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (
                    job_id,
                    spec["job_type"],
                    spec["model_name"],
                    spec["dataset_path"],
                    spec["priority"],
                    json.dumps(spec),
                    output_name,
                    total_steps,
                    memory_mb,
                    now,
                    now,
                ),
            )

    def set_detail(self, job_id: str, detail: str | None, now: float) -> None:
        """Set the human-readable note on what the job is doing or waiting for."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET detail = ?, updated_at = ? WHERE id = ?", (detail, now, job_id)
            )

    def mark_running(self, job_id: str, now: float) -> None:
        """Record that the job started (again, after a restart: attempts counts them)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'running', detail = NULL, attempts = attempts + 1, "
                "started_at = COALESCE(started_at, ?), updated_at = ? WHERE id = ?",
                (now, now, job_id),
            )

    def progress(self, job_id: str, step: int, losses: list[tuple[int, float]], now: float) -> None:
        """Record the step reached and append its losses."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO losses VALUES (?, ?, ?)",
                [(job_id, s, v) for s, v in losses],
            )
            self._db.execute(
                "UPDATE jobs SET step = ?, updated_at = ? WHERE id = ?", (step, now, job_id)
            )
            self._db.execute("COMMIT")

    def checkpoint(self, job_id: str, step: int, path: str, now: float) -> None:
        """Record that a checkpoint of step `step` is at `path`."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET checkpoint_step = ?, checkpoint_path = ?, updated_at = ? "
                "WHERE id = ?",
                (step, path, now, job_id),
            )

    def rewind(self, job_id: str, step: int) -> None:
        """Forget progress past `step` (a resume from the checkpoint of that step)."""
        with self._lock:
            self._db.execute("DELETE FROM losses WHERE job_id = ? AND step > ?", (job_id, step))
            self._db.execute("UPDATE jobs SET step = ? WHERE id = ?", (step, job_id))

    def set_metrics(self, job_id: str, metrics: dict[str, Any], now: float) -> None:
        """Replace the job's metrics (held-out losses before and after)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET metrics = ?, updated_at = ? WHERE id = ?",
                (json.dumps(metrics), now, job_id),
            )

    def finish(
        self,
        job_id: str,
        status: str,
        now: float,
        *,
        error: str | None = None,
        output_path: str | None = None,
    ) -> bool:
        """Move a job that is not final yet to a final status; False if it already was."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, error = ?, output_path = ?, detail = NULL, "
                "finished_at = ?, updated_at = ? WHERE id = ? AND status NOT IN "
                "('completed', 'failed', 'cancelled')",
                (status, error, output_path, now, now, job_id),
            )
            return cur.rowcount == 1

    def set_status(
        self, job_id: str, status: str, now: float, *, only_from: tuple[str, ...]
    ) -> bool:
        """Change the status when it is one of `only_from`; return whether it changed."""
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET status = ?, updated_at = ? WHERE id = ? AND status IN "
                f"({', '.join('?' * len(only_from))})",
                (status, now, job_id, *only_from),
            )
            return cur.rowcount == 1

    def recover(self, now: float) -> list[str]:
        """After a restart: requeue interrupted jobs, finish cancels; return requeued ids."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, updated_at = ? "
                "WHERE status = 'cancelling'",
                (now, now),
            )
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status = 'running'")]
            self._db.execute(
                "UPDATE jobs SET status = 'queued', detail = 'interrupted; resumes from its "
                "last checkpoint', updated_at = ? WHERE status = 'running'",
                (now,),
            )
            return ids
