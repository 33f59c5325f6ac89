"""The node's durable state in SQLite (WAL): which models were loaded, and pins.

One connection guarded by a lock: writes are rare (a load, an unload) and tiny, so a single
connection is simpler than a pool and WAL keeps readers off the writer's back.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS loaded_models (
    name        TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    backend     TEXT NOT NULL,
    n_ctx       INTEGER NOT NULL,
    gpu_layers  INTEGER NOT NULL,
    pinned      INTEGER NOT NULL DEFAULT 0,
    loaded_at   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class LoadedRecord:
    """A model that was loaded when the node last ran."""

    name: str
    path: str
    backend: str
    n_ctx: int
    gpu_layers: int
    pinned: bool


class StateStore:
    """The SQLite file `<state_dir>/moc-node.db`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def record_loaded(self, record: LoadedRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO loaded_models VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.path,
                    record.backend,
                    record.n_ctx,
                    record.gpu_layers,
                    int(record.pinned),
                    time.time(),
                ),
            )

    def record_unloaded(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM loaded_models WHERE name = ?", (name,))

    def loaded(self) -> list[LoadedRecord]:
        """Return the models to restore, oldest load first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, path, backend, n_ctx, gpu_layers, pinned FROM loaded_models "
                "ORDER BY loaded_at"
            ).fetchall()
        return [LoadedRecord(r[0], r[1], r[2], int(r[3]), int(r[4]), bool(r[5])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
