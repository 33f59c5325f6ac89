from __future__ import annotations

import pytest

from actors.serving.placement import (
    DeviceRoom,
    Placement,
    Resident,
    choose_device,
    evictable,
    expired,
    plan,
)


def room(name: str, mb: float) -> DeviceRoom:
    return DeviceRoom(name, mb)


def resident(
    name: str,
    device: str,
    mb: float,
    *,
    idle: bool = True,
    pinned: bool = False,
    idle_s: float = 60.0,
    reload_s: float = 1.0,
) -> Resident:
    return Resident(name, device, mb, idle, pinned, idle_s, reload_s)


@pytest.mark.parametrize(
    ("need", "devices", "expected"),
    [
        (100, [room("a", 1000)], "a"),
        (100, [room("a", 1000), room("b", 200)], "b"),  # best fit: least left over
        (100, [room("a", 150), room("b", 150)], "a"),  # equal: stable by name
        (500, [room("a", 400), room("b", 300)], None),
        (300, [room("a", 300)], "a"),  # exact fit
        (0, [], None),
    ],
    ids=["single", "best-fit-wins", "tie-by-name", "fits-nowhere", "exact-fit", "no-devices"],
)
def test_choose_device_picks_the_best_single_device_fit(
    need: float, devices: list[DeviceRoom], expected: str | None
) -> None:
    assert choose_device(need, devices) == expected


@pytest.mark.parametrize(
    ("need", "devices", "residents", "max_loaded", "expected"),
    [
        (100, [room("a", 500)], [], 0, Placement("a")),
        (
            800,
            [room("a", 500)],
            [resident("m1", "a", 400)],
            0,
            Placement("a", ("m1",)),
        ),
        (
            800,
            [room("a", 500)],
            [resident("m1", "a", 400, idle=False)],
            0,
            None,
        ),
        (
            800,
            [room("a", 500)],
            [resident("m1", "a", 400, pinned=True)],
            0,
            None,
        ),
        (
            700,
            [room("a", 500)],
            [resident("old", "a", 300, idle_s=600), resident("new", "a", 300, idle_s=5)],
            0,
            Placement("a", ("old",)),
        ),
        (
            700,
            [room("a", 500)],
            [
                resident("slow", "a", 300, idle_s=100, reload_s=60),
                resident("quick", "a", 300, idle_s=100, reload_s=1),
            ],
            0,
            Placement("a", ("quick",)),
        ),
        (
            100,
            [room("a", 5000)],
            [resident("m1", "a", 100), resident("m2", "a", 100, idle_s=999)],
            2,
            Placement("a", ("m2",)),
        ),
        (
            100,
            [room("a", 5000), room("b", 5000)],
            [resident("m1", "b", 100)],
            1,
            Placement("a", ("m1",)),
        ),
        (
            900,
            [room("a", 100), room("b", 600)],
            [resident("x", "a", 850, reload_s=30), resident("y", "b", 400, reload_s=2)],
            0,
            Placement("b", ("y",)),
        ),
    ],
    ids=[
        "fits-without-eviction",
        "evicts-an-idle-model",
        "never-evicts-a-busy-model",
        "never-evicts-a-pinned-model",
        "longest-idle-goes-first",
        "cheapest-reload-goes-first",
        "count-limit-frees-a-slot",
        "count-limit-frees-a-slot-on-another-device",
        "picks-the-device-with-the-cheapest-eviction",
    ],
)
def test_plan_places_and_evicts_as_the_table_says(
    need: float,
    devices: list[DeviceRoom],
    residents: list[Resident],
    max_loaded: int,
    expected: Placement | None,
) -> None:
    assert plan(need, devices, residents, max_loaded) == expected


def test_evictable_orders_cheapest_first_and_skips_busy_and_pinned() -> None:
    residents = [
        resident("busy", "a", 1, idle=False),
        resident("pinned", "a", 1, pinned=True),
        resident("recent", "a", 1, idle_s=1),
        resident("stale", "a", 1, idle_s=1000),
    ]
    assert [r.name for r in evictable(residents)] == ["stale", "recent"]


@pytest.mark.parametrize(
    ("residents", "keep_alive", "expected"),
    [
        ([resident("m1", "a", 100, idle_s=300)], None, []),
        ([resident("m1", "a", 100, idle_s=299.9)], 300.0, []),
        ([resident("m1", "a", 100, idle_s=300)], 300.0, ["m1"]),
        ([resident("m1", "a", 100, idle_s=900, pinned=True)], 300.0, []),
        ([resident("m1", "a", 100, idle_s=900, idle=False)], 300.0, []),
        ([resident("m1", "a", 100, idle_s=0)], 0.0, ["m1"]),
        ([resident("m1", "a", 100, idle_s=0, idle=False)], 0.0, []),
        (
            [
                resident("m1", "a", 100, idle_s=400),
                resident("m2", "b", 100, idle_s=10),
                resident("m3", "a", 100, idle_s=500),
            ],
            300.0,
            ["m1", "m3"],
        ),
    ],
    ids=[
        "no-keep-alive-keeps-all",
        "just-short-of-keep-alive",
        "at-keep-alive",
        "pinned-never",
        "busy-never",
        "zero-expires-idle-at-once",
        "zero-keeps-busy",
        "only-the-long-idle-of-several",
    ],
)
def test_expired_names_the_idle_unpinned_models_past_keep_alive(
    residents: list[Resident], keep_alive: float | None, expected: list[str]
) -> None:
    assert expired(residents, keep_alive) == expected
