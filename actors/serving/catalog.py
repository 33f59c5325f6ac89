"""The catalog as the manager's slots hold it: the operator's entries and registered outputs.

A catalog reload (SIGHUP) and a learning job's registration change which models exist. A model
that is loading, loaded or unloading keeps the entry it was loaded with: a new one replaces it
only once it is at rest (a registered output waits for the loaded model to stop; a catalog
entry is read again at the next reload or load). No I/O here: the manager publishes, drops and
records what these return.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.serving.config import CatalogEntry
from actors.serving.slot import Slot


def adopt_catalog(slots: dict[str, Slot], catalog: Sequence[CatalogEntry]) -> list[str]:
    """Bring `slots` in line with a reloaded catalog; return the names to drop.

    Every catalog name gets a slot (or its entry, if at rest). A name the catalog lost is no
    longer in it; one at rest is dropped, a loaded one stays until it stops. Registered outputs
    are not the catalog's to remove.
    """
    for entry in catalog:
        slot = slots.get(entry.name)
        if slot is None:
            slots[entry.name] = Slot(entry=entry, in_catalog=True)
        else:
            slot.in_catalog = True
            if slot.at_rest:
                slot.entry = entry
    kept = {entry.name for entry in catalog}
    drop = []
    for name, slot in slots.items():
        if slot.in_catalog and not slot.registered and name not in kept:
            slot.in_catalog = False
            if slot.at_rest:
                drop.append(name)
    return drop


def add_registered(slots: dict[str, Slot], entry: CatalogEntry) -> None:
    """Add (or replace) a model a learning job produced; a loaded one adopts it once stopped."""
    slot = slots.get(entry.name)
    if slot is None:
        slots[entry.name] = Slot(entry=entry, in_catalog=True, registered=True)
        return
    slot.in_catalog = slot.registered = True
    if slot.at_rest:
        slot.entry = entry
    else:
        slot.next_entry = entry


__all__ = ["add_registered", "adopt_catalog"]
