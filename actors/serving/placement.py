"""Where a model goes, what must leave to make room, what has sat idle too long: pure decisions.

No I/O, no clock: the caller passes each resident's idle time. Placement: the best single-device
fit (least memory left over), ties to the device with the most free memory. Eviction: only idle,
unpinned models; the cheapest to lose first, judged by how long each has been idle against how
long it takes to load again. Expiry: idle, unpinned models idle for `keep_alive` or longer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceRoom:
    """A device as placement sees it: MiB a new claim may take now."""

    name: str
    headroom_mb: float


@dataclass(frozen=True, slots=True)
class Resident:
    """A loaded model that placement may consider evicting."""

    name: str
    device: str
    claimed_mb: float
    idle: bool  # loaded, and no request admitted or waiting
    pinned: bool
    idle_seconds: float  # since its last request ended (or since it loaded)
    reload_seconds: float  # what it cost to load; what evicting it would cost later


@dataclass(frozen=True, slots=True)
class Placement:
    """Put the model on `device` after unloading `evict` (in order)."""

    device: str
    evict: tuple[str, ...] = ()


def choose_device(need_mb: float, devices: Sequence[DeviceRoom]) -> str | None:
    """Pick the device where `need_mb` fits best, or None when it fits nowhere as things are."""
    fits = [d for d in devices if d.headroom_mb >= need_mb]
    if not fits:
        return None
    best = min(fits, key=lambda d: (d.headroom_mb - need_mb, -d.headroom_mb, d.name))
    return best.name


def eviction_cost(resident: Resident) -> float:
    """Return what evicting a resident is likely to cost: its reload time, discounted the longer
    it has sat idle (a model unused for long is less likely to be asked for again soon)."""
    return (1.0 + resident.reload_seconds) / (1.0 + resident.idle_seconds)


def evictable(residents: Sequence[Resident]) -> list[Resident]:
    """Return the residents that may be evicted, cheapest first."""
    candidates = [r for r in residents if r.idle and not r.pinned]
    return sorted(candidates, key=lambda r: (eviction_cost(r), r.name))


def plan(
    need_mb: float,
    devices: Sequence[DeviceRoom],
    residents: Sequence[Resident],
    max_loaded: int = 0,
) -> Placement | None:
    """Decide where a model of `need_mb` goes and which idle models must leave first.

    Returns None when it cannot fit on any single device even after evicting every idle,
    unpinned model there (the caller answers "insufficient memory").
    """
    must_free_slot = max_loaded > 0 and len(residents) >= max_loaded
    if not must_free_slot:
        device = choose_device(need_mb, devices)
        if device is not None:
            return Placement(device)
    options: list[tuple[float, int, str, tuple[str, ...]]] = []
    for room in devices:
        evicted: list[str] = []
        freed = 0.0
        cost = 0.0
        slot_freed = not must_free_slot
        for resident in evictable([r for r in residents if r.device == room.name]):
            if room.headroom_mb + freed >= need_mb and slot_freed:
                break
            evicted.append(resident.name)
            freed += resident.claimed_mb
            cost += eviction_cost(resident)
            slot_freed = True
        if room.headroom_mb + freed >= need_mb and slot_freed:
            options.append((cost, len(evicted), room.name, tuple(evicted)))
    if must_free_slot:
        options.extend(_free_slot_elsewhere(need_mb, devices, residents))
    if not options:
        return None
    cost, count, device, evict = min(options)
    return Placement(device, evict)


def _free_slot_elsewhere(
    need_mb: float, devices: Sequence[DeviceRoom], residents: Sequence[Resident]
) -> list[tuple[float, int, str, tuple[str, ...]]]:
    """With the count limit reached, evict the cheapest idle model anywhere to free a slot."""
    victims = evictable(residents)
    if not victims:
        return []
    victim = victims[0]
    rooms = [
        DeviceRoom(d.name, d.headroom_mb + (victim.claimed_mb if d.name == victim.device else 0))
        for d in devices
    ]
    device = choose_device(need_mb, rooms)
    return [] if device is None else [(eviction_cost(victim), 1, device, (victim.name,))]


def expired(residents: Sequence[Resident], keep_alive_s: float | None) -> list[str]:
    """Return the residents to unload now: idle and unpinned for `keep_alive_s` or longer.

    `keep_alive_s` None keeps every model loaded; 0 unloads each as soon as it is idle.
    """
    if keep_alive_s is None:
        return []
    return [
        r.name for r in residents if r.idle and not r.pinned and r.idle_seconds >= keep_alive_s
    ]
