"""The node's durable state in SQLite (WAL): which models were loaded, and pins.

One connection guarded by a lock: writes are rare (a load, an unload) and tiny, so a single
connection is simpler than a pool and WAL keeps readers off the writer's back.

A write that SQLite refuses (a value it cannot encode, a full disk, a read-only file) raises
`StateNotWritable`, a MocError the caller turns into that one request's failure; text read back
that is not UTF-8 (a file edited by hand) is decoded with replacement characters rather than
failing the whole read.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.errors import StateNotWritable

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
CREATE TABLE IF NOT EXISTS registered_models (
    name        TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    lora        TEXT NOT NULL,
    backend     TEXT NOT NULL,
    n_ctx       INTEGER NOT NULL
);
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


@dataclass(frozen=True, slots=True)
class RegisteredRecord:
    """A model produced on this node (a fine-tuned GGUF, or a base plus a LoRA adapter)."""

    name: str
    path: str
    lora: str
    backend: str
    n_ctx: int


class StateStore:
    """The SQLite file `<state_dir>/moc-node.db`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.text_factory = _lenient_text
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def _write(self, sql: str, params: tuple[Any, ...], what: str) -> None:
        """Run one write; raise StateNotWritable (naming `what`) if SQLite refuses it."""
        try:
            with self._lock:
                self._db.execute(sql, params)
        except (sqlite3.Error, UnicodeError, OverflowError, ValueError) as exc:
            raise StateNotWritable(f"the state store could not record {what}: {exc}") from exc

    def record_loaded(self, record: LoadedRecord) -> None:
        """Remember a loaded model, to load it again at the next start."""
        self._write(
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
            f"model {record.name!r} as loaded",
        )

    def record_unloaded(self, name: str) -> None:
        """Forget a model that was unloaded on purpose."""
        self._write(
            "DELETE FROM loaded_models WHERE name = ?", (name,), f"model {name!r} as unloaded"
        )

    def loaded(self) -> list[LoadedRecord]:
        """Return the models to restore, oldest load first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, path, backend, n_ctx, gpu_layers, pinned FROM loaded_models "
                "ORDER BY loaded_at"
            ).fetchall()
        return [LoadedRecord(r[0], r[1], r[2], int(r[3]), int(r[4]), bool(r[5])) for r in rows]

    def record_registered(self, record: RegisteredRecord) -> None:
        """Remember a model a learning job produced, so it stays servable after a restart."""
        self._write(
            "INSERT OR REPLACE INTO registered_models VALUES (?, ?, ?, ?, ?)",
            (record.name, record.path, record.lora, record.backend, record.n_ctx),
            f"model {record.name!r} as registered",
        )

    def registered(self) -> list[RegisteredRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, path, lora, backend, n_ctx FROM registered_models ORDER BY name"
            ).fetchall()
        return [RegisteredRecord(r[0], r[1], r[2], r[3], int(r[4])) for r in rows]

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value), f"meta {key!r}")

    def next_generation(self) -> int:
        """Count this start: peers tell a restarted node's state from its old one by it."""
        generation = int(self.get_meta("generation") or 0) + 1
        self.set_meta("generation", str(generation))
        return generation

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _lenient_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")

