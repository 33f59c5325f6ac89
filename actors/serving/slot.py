"""Slot: everything the manager knows about one model, and what it publishes of it.

A model's state lives in the manager's slot (on the manager's thread) and nowhere else that
decides anything. What remains elsewhere is a view or a count kept where it is used: the board
(the slot as published, for other threads), the device ledger (its claim in MiB, shared with
learning jobs), the bulkhead (requests admitted and waiting, on the event loop) and the lane
(the requests running through to the worker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka

from actors.bridge import Reply
from actors.serving.config import CatalogEntry
from actors.serving.lane import ModelLane
from actors.serving.placement import Resident
from actors.serving.resilience import CircuitBreaker
from actors.types import ModelInfo, ModelState

Acquired = Reply[ModelLane]
"""Answers an acquire: the loaded model's lane, or why it cannot be served."""
Unloaded = Reply[ModelInfo]
"""Answers an unload: the model's state once it is gone."""


@dataclass
class Slot:
    """Everything the manager knows about one model."""

    entry: CatalogEntry
    in_catalog: bool
    registered: bool = False  # produced by a learning job, kept across catalog reloads
    state: ModelState = "available"
    device: str | None = None
    estimate_mb: float | None = None
    measured_mb: float | None = None
    actor: pykka.ActorRef[Any] | None = None
    lane: ModelLane | None = None  # the event loop's path to the loaded model
    breaker: CircuitBreaker | None = None  # outlives the lane: health shows a failed load's
    load_waiters: list[Acquired] = field(default_factory=list)
    unload_waiters: list[Unloaded] = field(default_factory=list)
    blocked_by: set[str] = field(default_factory=set)  # evictions to finish before loading
    persist_unload: bool = True
    last_used: float = 0.0  # the manager's clock (monotonic)
    last_used_wall: float | None = None  # for clients: seconds since the epoch
    load_seconds: float | None = None
    version: str = ""
    chat_template: str = ""
    threads: int = 0  # its share of the CPU's threads when held there (0: not on the CPU)
    slots: int | None = None  # requests its worker decodes at once, once started
    pid: int | None = None
    error: str | None = None
    next_entry: CatalogEntry | None = None  # a replacement registered while this one is loaded

    @property
    def at_rest(self) -> bool:
        """Neither loading, loaded nor unloading: no worker, and its entry may change."""
        return self.state in ("available", "failed")

    def come_to_rest(self) -> None:
        """Forget the stopped worker: a failed load stays failed, else the model is available;
        an entry registered while it ran takes over now."""
        if self.next_entry is not None:
            self.entry, self.next_entry = self.next_entry, None
        self.state = "failed" if self.state == "failed" else "available"
        self.device = None
        self.actor = None
        self.lane = None
        self.pid = None
        self.measured_mb = None
        self.slots = None


def resident(slot: Slot, *, claimed_mb: float, busy: bool, now: float) -> Resident:
    """Describe a resident slot for placement and expiry (`busy`: requests admitted or waiting)."""
    assert slot.device is not None
    return Resident(
        name=slot.entry.name,
        device=slot.device,
        claimed_mb=claimed_mb,
        idle=slot.state == "loaded" and not busy,
        pinned=slot.entry.pin,
        idle_seconds=max(0.0, now - slot.last_used),
        reload_seconds=slot.load_seconds or 1.0,
    )


def model_info(slot: Slot, device_label: Callable[[str], str]) -> ModelInfo:
    """Return the slot as clients see it."""
    entry = slot.entry
    return ModelInfo(
        name=entry.name,
        backend=entry.backend,
        path=entry.path,
        state=slot.state,
        device=device_label(slot.device) if slot.device else None,
        estimate_mb=None if slot.estimate_mb is None else round(slot.estimate_mb, 1),
        memory_mb=None if slot.measured_mb is None else round(slot.measured_mb, 1),
        pinned=entry.pin,
        last_used=slot.last_used_wall,
        version=slot.version,
        chat_template=slot.chat_template or None,
        slots=slot.slots,
        n_ctx=entry.n_ctx,
        load_seconds=slot.load_seconds,
        error=slot.error,
        pid=slot.pid,
        adapter=entry.lora or None,
    )


__all__ = ["Acquired", "Slot", "Unloaded", "model_info", "resident"]
