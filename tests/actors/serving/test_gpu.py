"""Waiting for a stopped model's GPU memory to come back, with a fake clock."""

from __future__ import annotations

from actors.serving.gpu import wait_for_release
from actors.serving.probes import DeviceReading
from tests.support import FakeClock


def test_waiting_for_release_returns_once_three_quarters_are_back() -> None:
    readings = iter(
        [DeviceReading(8_000, 5_000), DeviceReading(8_000, 4_500), DeviceReading(8_000, 4_200)]
    )
    clock = FakeClock(0.0)
    assert wait_for_release(lambda: next(readings), 5_000, 1_000, clock=clock, pause=clock.advance)
    assert clock() == 0.5  # two pauses: 500 MiB back is not yet 75%, 800 MiB is


def test_waiting_for_release_gives_up_after_the_timeout() -> None:
    clock = FakeClock(0.0)
    back = wait_for_release(
        lambda: DeviceReading(8_000, 5_000),
        5_000,
        1_000,
        timeout=1.0,
        clock=clock,
        pause=clock.advance,
    )
    assert back is False and clock() >= 1.0
