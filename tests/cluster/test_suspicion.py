from __future__ import annotations

import pytest

from cluster.suspicion import Suspicion, remaining_suspicion_time


@pytest.mark.parametrize(
    ("n", "k", "elapsed", "expected"),
    [
        (0, 3, 0, 30.0),
        (1, 3, 2, 14.0),
        (2, 3, 3, 4.81),
        (3, 3, 4, -2.0),
        (4, 3, 5, -3.0),
        (5, 3, 10, -8.0),
    ],
    ids=["none", "one", "two", "all", "beyond-k", "late"],
)
def test_remaining_time_matches_memberlists_table(
    n: int, k: int, elapsed: float, expected: float
) -> None:
    # memberlist suspicion_test.go TestSuspicion_remainingSuspicionTime (min 2 s, max 30 s).
    assert remaining_suspicion_time(n, k, elapsed, 2.0, 30.0) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("confirmers", "expected"),
    [
        ((), 2.0),
        (("me", "foo"), 1.25),
        (("me", "foo", "foo", "foo"), 1.25),
        (("me", "foo", "bar"), 0.811),  # 2 - log(3)/log(4) * 1.5, floored to the ms
        (("me", "foo", "bar", "baz"), 0.5),
        (("me", "foo", "bar", "baz", "zoo"), 0.5),
    ],
    ids=["no-confirmation", "one", "repeats-ignored", "two", "three", "beyond-k"],
)
def test_timer_shrinks_with_distinct_confirmations(
    confirmers: tuple[str, ...], expected: float
) -> None:
    # memberlist TestSuspicion_Timer: k=3, min 500 ms, max 2 s; the accuser "me" never counts.
    s = Suspicion("me", 3, 0.5, 2.0, start=100.0)
    for i, who in enumerate(confirmers):
        s.confirm(who, now=100.0 + 0.025 * (i + 1))
    assert s.deadline == pytest.approx(100.0 + expected, abs=1e-9)
    assert not s.expired(100.0 + expected - 0.001)
    assert s.expired(100.0 + expected)


def test_confirm_reports_only_new_information() -> None:
    s = Suspicion("me", 3, 0.5, 2.0, start=0.0)
    assert not s.confirm("me", 0.1)
    assert s.confirm("foo", 0.1)
    assert not s.confirm("foo", 0.2)


def test_a_confirmation_after_the_deadline_leaves_it_due() -> None:
    # memberlist TestSuspicion_Timer_Immediate: underflow fires at once, never later.
    s = Suspicion("me", 1, 0.1, 30.0, start=0.0)
    s.confirm("foo", now=0.2)
    assert s.expired(0.2)


def test_without_enough_peers_the_minimum_applies_at_once() -> None:
    s = Suspicion("me", 0, 0.5, 2.0, start=0.0)
    assert s.deadline == 0.5
