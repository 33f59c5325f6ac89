"""`[models] parallel` and a catalog entry's `parallel`: loaded, refused when bad, resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.serving.config import CatalogEntry
from actors.serving.entry import entry_for, need_mb, slots_of, worker_spec
from actors.types import LoadRequest
from moc_node.config import ConfigError, load_config

CATALOG = "[[models.catalog]]\nname = 'tiny'\npath = 'tiny.gguf'\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_node_default_is_one_slot_and_a_catalog_entry_leaves_it_to_the_node() -> None:
    config = load_config(None, env={})
    assert config.models.parallel == 1
    assert CatalogEntry(name="tiny", path="tiny.gguf").parallel == 0


def test_both_keys_load_from_the_file(tmp_path: Path) -> None:
    text = "[models]\nparallel = 8\n" + CATALOG + "parallel = 4\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.models.parallel == 8
    assert config.models.catalog[0].parallel == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[models]\nparallel = 0\n", "models.parallel: must be in 1..64"),
        ("[models]\nparallel = 65\n", "models.parallel: must be in 1..64"),
        ("[models]\nparallel = 'four'\n", "models.parallel"),
        (CATALOG + "parallel = -1\n", "models.catalog[0].parallel: must be 0"),
        (CATALOG + "parallel = 100\n", "models.catalog[0].parallel: must be 0"),
    ],
    ids=["node-zero", "node-too-many", "node-not-a-number", "entry-negative", "entry-too-many"],
)
def test_a_bad_parallel_stops_with_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text), env={})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_entry_s_slots_come_from_it_else_the_node_and_are_one_for_torch() -> None:
    entry = CatalogEntry(name="m", path="m.gguf")
    assert slots_of(entry) == 1
    assert slots_of(entry, node_parallel=8) == 8
    assert slots_of(CatalogEntry(name="m", path="m.gguf", parallel=4), node_parallel=8) == 4
    lora = CatalogEntry(name="m", path="m.gguf", parallel=4, lora="a.gguf")
    assert slots_of(lora, node_parallel=8) == 4  # the engine applies the adapter to every slot
    assert slots_of(CatalogEntry(name="m", path="m.pt2", backend="torch", parallel=4)) == 1


def test_a_catalog_entry_s_slots_reach_the_worker_and_a_client_cannot_set_them(
    small_gguf: Path,
) -> None:
    base = CatalogEntry(name="small", path=str(small_gguf), n_ctx=256, parallel=4)
    entry = entry_for(LoadRequest(name="small"), base, [small_gguf.parent])
    spec = worker_spec(entry, device_kind="cpu", device_index=None, cpu_repack=False)
    assert spec.load.parallel == 4
    uncatalogued = entry_for(
        LoadRequest(name="other", path=str(small_gguf)), None, [small_gguf.parent]
    )
    plain = worker_spec(uncatalogued, device_kind="cpu", device_index=None, cpu_repack=False)
    assert plain.load.parallel == 1
    node = worker_spec(
        uncatalogued, device_kind="cpu", device_index=None, cpu_repack=False, node_parallel=3
    )
    assert node.load.parallel == 3


def test_the_memory_need_grows_with_the_slots_by_their_kv_cache(small_gguf: Path) -> None:
    two = CatalogEntry(name="s", path=str(small_gguf), n_ctx=1024, parallel=2)
    eight = CatalogEntry(name="s", path=str(small_gguf), n_ctx=1024, parallel=8)
    # small: 4 layers, 4 KV heads of 32: a slot of 1024 positions is 2 MiB of f16 keys and
    # values; six more slots add 12 MiB (and six logits rows, a few KiB).
    grown = need_mb(eight, on_gpu=False) - need_mb(two, on_gpu=False)
    assert grown == pytest.approx(12.0, abs=0.05)
