"""The replay window, driven with explicit times: each request key taken once, memory bounded."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transports.replay_window import DEFAULT_CAPACITY, ReplayWindow

SPAN = 30.0
T0 = 1_000.0


def window(capacity: int = 100) -> ReplayWindow:
    return ReplayWindow(SPAN, capacity, floor=T0)


def test_a_request_key_is_taken_once_and_refused_after() -> None:
    w = window()
    assert w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 1)
    assert not w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 2)
    assert not w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 1 + SPAN)  # to the last second


@pytest.mark.parametrize(
    "other",
    [("node-c", "r1", 2), ("node-a", "r2", 2), ("node-a", "r1", 5)],
    ids=["another-sender", "another-request-id", "another-operation"],
)
def test_keys_that_differ_in_sender_id_or_operation_are_separate_requests(
    other: tuple[str, str, int],
) -> None:
    w = window()
    assert w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 1)
    assert w.admit(other, T0 + 1, now=T0 + 1)


def test_a_key_is_forgotten_once_its_frame_is_older_than_the_span_and_such_frames_are_refused() -> (
    None
):
    w = window()
    assert w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 1)
    assert w.admit(("node-a", "r2", 2), T0 + 20, now=T0 + 20)
    assert not w.admit(("node-a", "r3", 2), T0 + 2, now=T0 + 2 + SPAN + 0.1)  # too old to vouch
    assert len(w) == 1  # r1 is gone: its frame would be stale anyway
    assert not w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 2 + SPAN)


def test_a_frame_stamped_at_or_before_the_floor_is_refused() -> None:
    # A new window's floor is its start: its process's previous incarnation may have taken it.
    w = window()
    assert not w.admit(("node-a", "r1", 2), T0, now=T0 + 1)
    assert not w.admit(("node-a", "r2", 2), T0 - 5, now=T0 + 1)
    assert w.admit(("node-a", "r3", 2), T0 + 0.001, now=T0 + 1)


def test_at_capacity_the_oldest_key_goes_and_the_floor_rises_so_its_replay_is_still_refused() -> (
    None
):
    w = window(capacity=3)
    for i in range(3):
        assert w.admit(("node-a", f"r{i}", 2), T0 + 1 + i, now=T0 + 5)
    assert w.admit(("node-a", "r3", 2), T0 + 4, now=T0 + 5)  # r0 forgotten: floor at its stamp
    assert len(w) == 3 and w.floor == T0 + 1
    assert not w.admit(("node-a", "r0", 2), T0 + 1, now=T0 + 6)  # a replay of r0: still refused
    assert not w.admit(("node-a", "late", 2), T0 + 0.5, now=T0 + 6)  # older than the floor
    assert w.admit(("node-a", "r4", 2), T0 + 6, now=T0 + 6)  # fresh frames are taken


def test_a_flood_of_distinct_requests_keeps_the_window_at_its_capacity() -> None:
    w = window(capacity=1_000)
    for i in range(20_000):
        now = T0 + 1 + i / 1_000  # 1,000 requests a second over 20 s
        assert w.admit(("node-a", f"r{i}", 2), now, now)
    assert len(w) == 1_000
    assert w.floor > T0 + 19  # the window shrank to the last second, fresh frames still go in


@given(
    st.lists(
        st.tuples(
            st.integers(0, 20),  # request id
            st.floats(-40, 40),  # the frame's stamp, relative to the clock when it arrives
            st.floats(0, 5),  # how far the clock moved before it arrived
        ),
        max_size=200,
    ),
    st.integers(1, 8),
)
def test_no_frame_is_ever_taken_twice_whatever_the_order_times_and_capacity(
    arrivals: list[tuple[int, float, float]], capacity: int
) -> None:
    w = window(capacity)
    now = T0
    taken: set[tuple[int, float]] = set()
    sent: list[tuple[int, float]] = []
    for rid, offset, step in arrivals:
        now += step
        frame = (rid, now + offset)
        for replayed in (frame, *sent[-3:]):  # each new frame, then replays of recent ones
            if w.admit(("node-a", str(replayed[0]), 2), replayed[1], now):
                assert replayed not in taken, replayed
                taken.add(replayed)
            assert len(w) <= capacity
        sent.append(frame)


def test_a_frame_stamped_nan_is_refused_and_does_not_stop_older_keys_expiring() -> None:
    # NaN compares false both ways: taken, it would sit in the time order and stop expiry.
    w = window()
    assert not w.admit(("node-a", "nan", 2), float("nan"), now=T0 + 1)
    assert w.admit(("node-a", "r1", 2), T0 + 1, now=T0 + 1)
    assert w.admit(("node-a", "r2", 2), T0 + 1 + SPAN + 5, now=T0 + 1 + SPAN + 5)
    assert len(w) == 1  # r1 expired


def test_a_full_window_holds_no_more_memory_than_the_empty_one_it_started_as() -> None:
    # Keys built as the peer server builds them, fresh strs per frame, which the window must
    # not keep: its 2 MiB are allocated when it is made, so the node's RSS does not creep.
    n, sender = DEFAULT_CAPACITY, "b"
    tracemalloc.start()
    try:
        w = ReplayWindow(SPAN, n, floor=T0)
        made = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            ts = T0 + 1 + i / 10_000  # all within the span
            assert w.admit((f"node-{sender}", f"0123456789abcdef-{i}", 2), ts, ts)
        held = tracemalloc.get_traced_memory()[0] - made
    finally:
        tracemalloc.stop()
    assert len(w) == n
    assert made <= 2.25 * 2**20, f"{made / 2**20:.2f} MiB for {n} requests"
    assert held < 4_096, f"{held} bytes more once full"


def test_every_held_key_stays_refused_through_a_long_churn_of_the_table() -> None:
    # Each admit past capacity removes a key from the table (moving others back): a key lost
    # there would be taken again, since every held one is stamped above the floor.
    capacity = 64
    w = window(capacity)
    for i in range(5_000):
        ts = T0 + 1 + i / 1_000
        assert w.admit(("node-a", f"r{i}", 2), ts, ts)
        if i % 97 == 0:
            held = range(max(0, i - capacity + 1), i + 1)
            assert not any(w.admit(("node-a", f"r{k}", 2), T0 + 1 + k / 1_000, ts) for k in held)
    assert len(w) == capacity
