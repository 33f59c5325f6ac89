from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from actors.errors import StateNotWritable
from actors.serving.store import LoadedRecord, RegisteredRecord, StateStore


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
    from moc_node.term_store import TermStore

    store = StateStore(tmp_path / "s.db")
    assert TermStore(store).load() == 0
    TermStore(store).save(7)
    assert store.next_generation() == 1
    store.close()
    reopened = StateStore(tmp_path / "s.db")
    assert TermStore(reopened).load() == 7
    assert reopened.next_generation() == 2
    reopened.close()


def test_a_value_sqlite_cannot_encode_fails_that_write_as_state_not_writable(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "s.db")
    with pytest.raises(StateNotWritable, match="model 'sur\\\\ud800x' as loaded"):
        store.record_loaded(LoadedRecord("sur\ud800x", "/m/a.gguf", "gguf", 512, -1, False))
    with pytest.raises(StateNotWritable):
        store.record_registered(RegisteredRecord("\udc80", "/m/a.gguf", "", "gguf", 512))
    store.record_loaded(LoadedRecord("a", "/m/a.gguf", "gguf", 512, -1, False))
    assert [r.name for r in store.loaded()] == ["a"]  # the store itself is unharmed
    store.close()


def test_a_write_sqlite_refuses_names_what_could_not_be_recorded(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    store.record_loaded(LoadedRecord("a", "/m/a.gguf", "gguf", 512, -1, False))
    sqlite3.connect(tmp_path / "s.db", isolation_level=None).execute(
        "CREATE TRIGGER no BEFORE DELETE ON loaded_models BEGIN SELECT RAISE(ABORT, 'full'); END"
    )
    with pytest.raises(StateNotWritable, match="model 'a' as unloaded: full"):
        store.record_unloaded("a")
    store.close()


def test_text_that_is_not_utf8_reads_back_with_replacement_characters(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    raw = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    raw.execute(
        "INSERT INTO loaded_models VALUES (CAST(x'61ff62' AS TEXT), '/m/a.gguf', 'gguf', 512, -1,"
        " 0, 1.0)"
    )
    assert [r.name for r in store.loaded()] == ["a\ufffdb"]
    store.close()
