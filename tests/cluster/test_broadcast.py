from __future__ import annotations

from cluster.broadcast import BroadcastQueue
from cluster.messages import Alive, Dead, Suspect


def alive(node: str, inc: int = 1, meta: bytes = b"") -> Alive:
    return Alive(inc, node, ("10.0.0.1", 7946), meta)


def test_a_newer_message_about_a_node_replaces_the_older_one() -> None:
    q = BroadcastQueue(4)
    q.queue("a", alive("a", 1), 30)
    q.queue("a", Suspect(1, "a", "b"), 20)
    assert len(q) == 1
    assert q.take(1000, n=3) == [Suspect(1, "a", "b")]


def test_least_sent_goes_first_then_largest_then_newest() -> None:
    q = BroadcastQueue(4)
    q.queue("a", alive("a"), 10)
    q.queue("b", alive("b"), 50)
    q.queue("c", alive("c"), 10)
    assert [m.node for m in q.take(1000, n=3)] == ["b", "c", "a"]  # type: ignore[union-attr]
    q.queue("d", alive("d"), 5)
    # d has never been sent, so it leads; the others follow by size then age.
    assert [m.node for m in q.take(1000, n=3)][0] == "d"  # type: ignore[union-attr]


def test_messages_leave_after_the_retransmit_limit() -> None:
    q = BroadcastQueue(4)
    q.queue("a", Dead(1, "a", "b"), 20)
    # n = 9 -> 4 * ceil(log10 10) = 4 transmits.
    sent = sum(len(q.take(1000, n=9)) for _ in range(10))
    assert sent == 4
    assert len(q) == 0


def test_a_retransmit_base_adds_that_many_transmits_whatever_the_size() -> None:
    q = BroadcastQueue(4, retransmit_base=14)
    q.queue("a", Dead(1, "a", "b"), 20)
    # n = 100 -> 14 + 4 * ceil(log10 101) = 26 transmits.
    sent = sum(len(q.take(1000, n=100)) for _ in range(30))
    assert sent == 26
    assert len(q) == 0


def test_take_respects_the_byte_budget_and_skips_to_smaller_ones() -> None:
    q = BroadcastQueue(4)
    q.queue("big", alive("big"), 900)
    q.queue("small", alive("small"), 100)
    q.queue("mid", alive("mid"), 500)
    got = q.take(1000, n=3)
    assert [m.node for m in got] == ["big", "small"]  # type: ignore[union-attr]
    assert q.take(0, n=3) == []
