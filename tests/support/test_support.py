from __future__ import annotations

import threading

import pytest

from tests.support import FakeClock, wait_for, wait_until


def test_wait_until_returns_once_the_condition_holds() -> None:
    flag = threading.Event()
    threading.Timer(0.05, flag.set).start()
    wait_until(flag.is_set, timeout=5, what="the timer")
    assert flag.is_set()


def test_wait_until_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.05, what="the impossible")


async def test_wait_for_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="never"):
        await wait_for(lambda: False, timeout=0.05, what="never")


def test_a_fake_clock_moves_only_when_told_and_never_back() -> None:
    clock = FakeClock(start=5.0)
    assert clock() == clock() == 5.0
    assert clock.advance(2.5) == 7.5 == clock()
    with pytest.raises(ValueError):
        clock.advance(-1)
