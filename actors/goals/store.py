"""The goals' durable state in SQLite (WAL): goals, their steps, step results and progress.

Every step's start and finish is a write that lands before anyone acts on it, and a finished
step moves its goal on in the same transaction, so after a crash a goal sits exactly at the
step that had not finished: a completed step is never run again. A step records its handle
(a train step's learning job id) before waiting on it, so a resumed step re-attaches.
One connection guarded by a lock, as `actors.serving.store`: writes are few and tiny.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from actors.goals.model import (
    DeployStep,
    EvaluateStep,
    GateStep,
    Goal,
    GoalDraft,
    Step,
    StepState,
    TrainStep,
    UnloadStep,
    step_as_dict,
)
from actors.goals.plan import Transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS goals (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    title        TEXT NOT NULL,
    description  TEXT NOT NULL,
    priority     TEXT NOT NULL,
    legacy       INTEGER NOT NULL,
    metadata     TEXT NOT NULL,
    status       TEXT NOT NULL,
    current_step INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS goals_status ON goals (status);
CREATE TABLE IF NOT EXISTS steps (
    goal_id      TEXT NOT NULL REFERENCES goals (id),
    idx          INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    spec         TEXT NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending',
    handle       TEXT,
    progress     REAL NOT NULL DEFAULT 0,
    result       TEXT NOT NULL DEFAULT '{}',
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    started_at   REAL,
    finished_at  REAL,
    PRIMARY KEY (goal_id, idx)
);
"""

_GOAL_COLUMNS = (
    "seq, id, title, description, priority, legacy, metadata, status, current_step, error, "
    "created_at, started_at, finished_at"
)
_STEP_COLUMNS = (
    "goal_id, idx, kind, spec, status, handle, progress, result, error, attempts, started_at, "
    "finished_at"
)


def step_from_dict(data: Mapping[str, Any]) -> Step:
    """Rebuild a stored step (already checked when the goal was created)."""
    fields = {k: v for k, v in data.items() if k != "kind"}
    kind = data["kind"]
    if kind == "train":
        return TrainStep(job=fields)
    if kind == "evaluate":
        return EvaluateStep(**fields)
    if kind == "gate":
        return GateStep(**fields)
    if kind == "deploy":
        return DeployStep(**fields)
    if kind == "unload":
        return UnloadStep(**fields)
    raise ValueError(f"unknown step kind {kind!r} in the goal store")


class GoalStore:
    """The SQLite file holding every goal (default `<state_dir>/goals/goals.db`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a step's start, handle and finish must survive a power cut, not only kill -9;
        # they are a handful of writes per step, so the fsync costs nothing that matters.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # -- reading ----------------------------------------------------------------------------

    def get(self, goal_id: str) -> Goal | None:
        """Return one goal with its steps, or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_GOAL_COLUMNS} FROM goals WHERE id = ?", (goal_id,)
            ).fetchone()
            if row is None:
                return None
            steps = self._db.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE goal_id = ? ORDER BY idx", (goal_id,)
            ).fetchall()
        return _goal(row, steps)

    def list(
        self, statuses: tuple[str, ...] = (), *, limit: int | None = None, offset: int = 0
    ) -> list[Goal]:
        """Return the goals (of the given statuses, if any), oldest first: at most `limit`
        (None: all) from position `offset`, read from SQLite as such (a page, not the table)."""
        where = f"WHERE status IN ({', '.join('?' * len(statuses))})" if statuses else ""
        window = (-1 if limit is None else limit, offset)  # LIMIT -1: no limit
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_GOAL_COLUMNS} FROM goals {where} ORDER BY seq LIMIT ? OFFSET ?",
                (*statuses, *window),
            ).fetchall()
            ids = [r[1] for r in rows]
            steps: dict[str, list[tuple[Any, ...]]] = {i: [] for i in ids}
            if ids:
                marks = ", ".join("?" * len(ids))
                for s in self._db.execute(
                    f"SELECT {_STEP_COLUMNS} FROM steps WHERE goal_id IN ({marks}) "
                    "ORDER BY goal_id, idx",
                    ids,
                ):
                    steps[s[0]].append(s)
        return [_goal(r, steps[r[1]]) for r in rows]

    def count(self, statuses: tuple[str, ...] = ()) -> int:
        """Return how many goals are stored (of the given statuses, if any)."""
        where = f"WHERE status IN ({', '.join('?' * len(statuses))})" if statuses else ""
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM goals {where}", statuses).fetchone()
        return int(row[0])

    # -- writing ----------------------------------------------------------------------------

    def prune_finished(self, keep: int) -> int:
        """Delete the oldest finished goals until at most `keep` remain; return how many went.

        Only goals that are over (completed, failed, cancelled) with no step still running (a
        cancel still stopping its job) go; open goals are never pruned, so fewer may go than
        asked.
        """
        with self._lock, self._transaction():
            total = int(self._db.execute("SELECT COUNT(*) FROM goals").fetchone()[0])
            if total <= keep:
                return 0
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM goals WHERE status IN ('completed', 'failed', 'cancelled') "
                    "AND NOT EXISTS (SELECT 1 FROM steps WHERE goal_id = goals.id "
                    "AND status = 'running') ORDER BY seq LIMIT ?",
                    (total - keep,),
                )
            ]
            for chunk in range(0, len(ids), 500):  # under SQLite's bound on parameters
                part = ids[chunk : chunk + 500]
                marks = ", ".join("?" * len(part))
                self._db.execute(f"DELETE FROM steps WHERE goal_id IN ({marks})", part)
                self._db.execute(f"DELETE FROM goals WHERE id IN ({marks})", part)
            return len(ids)

    def insert(self, goal_id: str, draft: GoalDraft, now: float) -> Goal:
        """Store a new pending goal and its pending steps; return it."""
        with self._lock, self._transaction():
            self._db.execute(
                "INSERT INTO goals (id, title, description, priority, legacy, metadata, status, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    goal_id,
                    draft.title,
                    draft.description,
                    draft.priority,
                    int(draft.legacy),
                    json.dumps(dict(draft.metadata), default=str),
                    now,
                    now,
                ),
            )
            self._db.executemany(
                "INSERT INTO steps (goal_id, idx, kind, spec) VALUES (?, ?, ?, ?)",
                [
                    (goal_id, i, step.kind, json.dumps(step_as_dict(step)))
                    for i, step in enumerate(draft.steps)
                ],
            )
        goal = self.get(goal_id)
        assert goal is not None
        return goal

    def start_goal(self, goal_id: str, now: float) -> bool:
        """Move a pending goal to running; False if it was not pending (e.g. cancelled)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE goals SET status = 'running', started_at = COALESCE(started_at, ?), "
                "updated_at = ? WHERE id = ? AND status = 'pending'",
                (now, now, goal_id),
            )
            return cur.rowcount == 1

    def begin_step(self, goal_id: str, index: int, now: float) -> StepState | None:
        """Mark a step of a running goal as running (one more attempt); None if it may not run.

        A step that was running when the node died keeps its handle and first start time.
        """
        with self._lock, self._transaction():
            cur = self._db.execute(
                "UPDATE steps SET status = 'running', attempts = attempts + 1, "
                "started_at = COALESCE(started_at, ?) "
                "WHERE goal_id = ? AND idx = ? AND status IN ('pending', 'running') "
                "AND EXISTS (SELECT 1 FROM goals WHERE id = ? AND status = 'running' "
                "AND current_step = ?)",
                (now, goal_id, index, goal_id, index),
            )
            if cur.rowcount != 1:
                return None
            self._touch(goal_id, now)
            row = self._db.execute(
                f"SELECT {_STEP_COLUMNS} FROM steps WHERE goal_id = ? AND idx = ?",
                (goal_id, index),
            ).fetchone()
        return _state(row)

    def attach(self, goal_id: str, index: int, handle: str) -> None:
        """Record what a running step waits on (before it waits), so a restart re-attaches."""
        with self._lock:
            self._db.execute(
                "UPDATE steps SET handle = ? WHERE goal_id = ? AND idx = ?",
                (handle, goal_id, index),
            )

    def set_progress(self, goal_id: str, index: int, progress: float) -> None:
        """Record a running step's progress (0..1)."""
        with self._lock:
            self._db.execute(
                "UPDATE steps SET progress = ? WHERE goal_id = ? AND idx = ? AND status = 'running'",
                (min(1.0, max(0.0, progress)), goal_id, index),
            )

    def finish_step(
        self,
        goal_id: str,
        index: int,
        *,
        ok: bool,
        result: Mapping[str, Any],
        error: str | None,
        transition: Transition,
        now: float,
    ) -> bool:
        """Finish a running step and move its goal on, in one transaction.

        Returns False (and writes nothing) when the goal is no longer running at this step, e.g.
        it was cancelled meanwhile.
        """
        with self._lock, self._transaction():
            cur = self._db.execute(
                "UPDATE goals SET status = ?, current_step = ?, error = ?, updated_at = ?, "
                "finished_at = CASE WHEN ? IN ('completed', 'failed') THEN ? ELSE NULL END "
                "WHERE id = ? AND status = 'running' AND current_step = ?",
                (
                    transition.status,
                    transition.current_step,
                    transition.error,
                    now,
                    transition.status,
                    now,
                    goal_id,
                    index,
                ),
            )
            if cur.rowcount != 1:
                return False
            self._db.execute(
                "UPDATE steps SET status = ?, result = ?, error = ?, finished_at = ?, "
                "progress = CASE WHEN ? THEN 1.0 ELSE progress END "
                "WHERE goal_id = ? AND idx = ?",
                (
                    "completed" if ok else "failed",
                    json.dumps(dict(result), default=str),
                    error,
                    now,
                    ok,
                    goal_id,
                    index,
                ),
            )
        return True

    def cancel_goal(self, goal_id: str, now: float) -> bool:
        """Mark a pending or running goal cancelled, and its pending steps; False if it had ended.

        A running step stays `running` until its executor has let go (and cancelled its learning
        job); `step_cancelled` then closes it.
        """
        with self._lock, self._transaction():
            cur = self._db.execute(
                "UPDATE goals SET status = 'cancelled', error = 'cancelled', finished_at = ?, "
                "updated_at = ? WHERE id = ? AND status IN ('pending', 'running')",
                (now, now, goal_id),
            )
            if cur.rowcount != 1:
                return False
            self._db.execute(
                "UPDATE steps SET status = 'cancelled' WHERE goal_id = ? AND status = 'pending'",
                (goal_id,),
            )
        return True

    def step_cancelled(
        self, goal_id: str, index: int, result: Mapping[str, Any], now: float
    ) -> None:
        """Close the running step of a cancelled goal."""
        with self._lock:
            self._db.execute(
                "UPDATE steps SET status = 'cancelled', result = ?, finished_at = ? "
                "WHERE goal_id = ? AND idx = ? AND status = 'running'",
                (json.dumps(dict(result), default=str), now, goal_id, index),
            )

    # -- internals --------------------------------------------------------------------------

    def _touch(self, goal_id: str, now: float) -> None:
        self._db.execute("UPDATE goals SET updated_at = ? WHERE id = ?", (now, goal_id))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _state(row: tuple[Any, ...]) -> StepState:
    return StepState(
        index=int(row[1]),
        kind=row[2],
        status=row[4],
        handle=row[5],
        progress=float(row[6]),
        result=json.loads(row[7]),
        error=row[8],
        attempts=int(row[9]),
        started_at=row[10],
        finished_at=row[11],
    )


def _goal(row: tuple[Any, ...], steps: list[tuple[Any, ...]]) -> Goal:
    return Goal(
        seq=int(row[0]),
        id=row[1],
        title=row[2],
        description=row[3],
        priority=row[4],
        legacy=bool(row[5]),
        metadata=json.loads(row[6]),
        status=row[7],
        current_step=int(row[8]),
        error=row[9],
        created_at=float(row[10]),
        started_at=row[11],
        finished_at=row[12],
        steps=tuple(step_from_dict(json.loads(s[3])) for s in steps),
        states=tuple(_state(s) for s in steps),
    )
