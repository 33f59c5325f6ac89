from __future__ import annotations

import sqlite3
from pathlib import Path

from actors.store import LoadedRecord, StateStore


def test_the_loaded_set_survives_a_reopen_in_load_order(tmp_path: Path) -> None:
    db = tmp_path / "state" / "moc-node.db"
    store = StateStore(db)
    store.record_loaded(LoadedRecord("a", "/m/a.gguf", "gguf", 512, -1, False))
    store.record_loaded(LoadedRecord("b", "/m/b.gguf", "gguf", 1024, 0, True))
    store.record_loaded(LoadedRecord("c", "/m/c.pt", "torch", 2048, 0, False))
    store.record_unloaded("c")
    store.close()

    reopened = StateStore(db)
    assert [r.name for r in reopened.loaded()] == ["a", "b"]
    assert reopened.loaded()[1].pinned is True
    reopened.close()


def test_the_store_uses_write_ahead_logging(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    mode = sqlite3.connect(tmp_path / "s.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    store.close()


def test_the_term_and_generation_survive_a_reopen(tmp_path: Path) -> None:
    from actors.store import TermStore

    store = StateStore(tmp_path / "s.db")
    assert TermStore(store).load() == 0
    TermStore(store).save(7)
    assert store.next_generation() == 1
    store.close()
    reopened = StateStore(tmp_path / "s.db")
    assert TermStore(reopened).load() == 7
    assert reopened.next_generation() == 2
    reopened.close()
