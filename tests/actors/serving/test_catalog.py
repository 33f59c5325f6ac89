"""Catalog reloads and registered outputs, as the manager's slots hold them."""

from __future__ import annotations

import pytest

from actors.serving.catalog import add_registered, adopt_catalog
from actors.serving.config import CatalogEntry
from actors.serving.slot import Slot
from actors.types import ModelState


def entry(name: str, path: str = "old.gguf") -> CatalogEntry:
    return CatalogEntry(name, f"/models/{path}")


def slot(
    name: str, state: ModelState, *, in_catalog: bool = True, registered: bool = False
) -> Slot:
    return Slot(entry=entry(name), in_catalog=in_catalog, registered=registered, state=state)


@pytest.mark.parametrize(
    ("before", "expected_path", "dropped"),
    [
        ({}, "new.gguf", []),
        ({"m": slot("m", "available")}, "new.gguf", []),
        ({"m": slot("m", "failed")}, "new.gguf", []),
        ({"m": slot("m", "loaded")}, "old.gguf", []),
        ({"m": slot("m", "loading")}, "old.gguf", []),
        ({"m": slot("m", "loaded", in_catalog=False)}, "old.gguf", []),
    ],
    ids=["new-name", "at-rest-takes-it", "failed-takes-it", "loaded-keeps-its", "loading-keeps-its",
         "loaded-by-path-joins"],
)  # fmt: skip
def test_a_reloaded_catalog_entry_replaces_only_a_slot_at_rest(
    before: dict[str, Slot], expected_path: str, dropped: list[str]
) -> None:
    assert adopt_catalog(before, [entry("m", "new.gguf")]) == dropped
    assert before["m"].entry.path == f"/models/{expected_path}" and before["m"].in_catalog


@pytest.mark.parametrize(
    ("gone", "dropped", "in_catalog"),
    [
        (slot("m", "available"), ["m"], False),
        (slot("m", "loaded"), [], False),
        (slot("m", "available", registered=True), [], True),
        (slot("m", "available", in_catalog=False), [], False),
    ],
    ids=["at-rest-dropped", "loaded-stays-until-stopped", "registered-kept", "not-the-catalogs"],
)
def test_a_name_the_catalog_lost_is_dropped_once_at_rest_and_registered_outputs_stay(
    gone: Slot, dropped: list[str], in_catalog: bool
) -> None:
    slots = {"m": gone}
    assert adopt_catalog(slots, []) == dropped
    assert slots["m"].in_catalog is in_catalog


def test_a_registered_output_replaces_a_model_at_rest_at_once() -> None:
    slots = {"m": slot("m", "available", in_catalog=False)}
    add_registered(slots, entry("m", "out.gguf"))
    assert slots["m"].entry.path == "/models/out.gguf"
    assert slots["m"].registered and slots["m"].in_catalog and slots["m"].next_entry is None


def test_a_registered_output_waits_for_the_loaded_model_of_its_name_to_stop() -> None:
    slots = {"m": slot("m", "loaded")}
    add_registered(slots, entry("m", "out.gguf"))
    assert slots["m"].entry.path == "/models/old.gguf"
    assert slots["m"].next_entry == entry("m", "out.gguf")


def test_a_new_registered_output_gets_a_slot_of_its_own() -> None:
    slots: dict[str, Slot] = {}
    add_registered(slots, entry("m", "out.gguf"))
    assert slots["m"].registered and slots["m"].state == "available"


def test_the_waiting_output_takes_over_when_the_loaded_model_comes_to_rest() -> None:
    slots = {"m": slot("m", "loaded")}
    slots["m"].device, slots["m"].pid, slots["m"].measured_mb = "cpu", 42, 100.0
    add_registered(slots, entry("m", "out.gguf"))
    slots["m"].come_to_rest()
    m = slots["m"]
    assert (m.state, m.entry.path, m.next_entry) == ("available", "/models/out.gguf", None)
    assert (m.device, m.pid, m.measured_mb) == (None, None, None)
