"""Property tests of the membership merge: how alive/suspect/dead/left messages update the table.

The rules are memberlist's (state.go `aliveNode`, `suspectNode`, `deadNode`): an alive needs a
strictly newer incarnation; suspect and dead take an equal one; a dead or left member is not
suspected and comes back only with a newer alive; a node accused of anything refutes with an
incarnation above the accusation. Node "a" is the one under test and knows "b" and "c" at
incarnation 1; the messages are about "b" and about "a" itself. No timer runs (`tick` is never
called): these are the merge rules alone.

Two memberlist rules make the order of suspicions matter, and are kept on purpose: a suspicion of a
member already dead or left is ignored whatever its incarnation, and a second suspicion of a member
already suspected only confirms the first (its incarnation is not taken). So the "any order gives
the same table" properties hold for alive/dead/left messages, and for alive messages with one
suspicion; the other properties hold for any sequence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import codec
from cluster.config import lan
from cluster.keyring import Keyring
from cluster.membership import Membership
from cluster.messages import (
    Address,
    Alive,
    Dead,
    MemberState,
    Message,
    PushNodeState,
    PushPull,
    Suspect,
)

SETTINGS = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])

ADDRS: dict[str, Address] = {"a": ("10.0.0.1", 7946), "b": ("10.0.0.2", 7946), "c": ("10.0.0.3", 7946)}  # fmt: skip
NOW = 1.0
WIRE_MAX = 2**64 - 1
"""The largest incarnation the codec decodes (msgpack's uint64)."""

Row = tuple[str, MemberState, int, Address, bytes]
Fact = Alive | Suspect | Dead


def node() -> Membership:
    """Return node "a" knowing "b" and "c" alive at incarnation 1."""
    m = Membership(lan(), "a", ADDRS["a"], random.Random(0), now=0.0)
    for peer in ("b", "c"):
        m.handle(Alive(1, peer, ADDRS[peer], meta_of(1)), ADDRS[peer], 0.0)
    m.events()
    return m


def meta_of(incarnation: int) -> bytes:
    """Return the metadata a member publishes with an incarnation (one fact per incarnation)."""
    return b"" if incarnation == 1 else f"meta-{incarnation}".encode()


def table(m: Membership) -> list[Row]:
    """Return the member table without the times of change."""
    return sorted((v.name, v.state, v.incarnation, v.addr, v.meta) for v in m.members())


def apply(m: Membership, messages: Sequence[Message]) -> Membership:
    for msg in messages:
        m.handle(msg, ADDRS["c"], NOW)
    return m


def verdicts(m: Membership) -> list[tuple[str, MemberState, int, bytes | None]]:
    """Return each member's state and incarnation, and its metadata when alive."""
    return sorted(
        (v.name, v.state, v.incarnation, v.meta if v.state == MemberState.ALIVE else None)
        for v in m.members()
    )


def row(m: Membership, name: str) -> tuple[MemberState, int]:
    v = m.member(name)
    assert v is not None
    return v.state, v.incarnation


# ---- strategies ----

INCS = st.integers(min_value=0, max_value=6)
ACCUSERS = st.sampled_from(["c", "d", "e"])


def alive_b(inc: int) -> Alive:
    return Alive(inc, "b", ADDRS["b"], meta_of(inc))


def dead_b(inc: int) -> Dead:
    return Dead(inc, "b", "c")


def left_b(inc: int) -> Dead:
    return Dead(inc, "b", "b")  # the node announced its own death: it left


@st.composite
def alives_and_one_accusation(draw: st.DrawFn) -> list[Fact]:
    """Alive messages about "b" (one fact per incarnation) and one suspect, dead or left."""
    alives: list[Fact] = [alive_b(i) for i in draw(st.lists(INCS, max_size=6))]
    inc, who = draw(INCS), draw(ACCUSERS)
    accusations: list[Fact] = [Suspect(inc, "b", who), dead_b(inc), left_b(inc)]
    return [*alives, draw(st.sampled_from(accusations))]


ABOUT_B = st.one_of(
    st.builds(alive_b, INCS),
    st.builds(lambda i, meta: Alive(i, "b", ADDRS["b"], meta), INCS, st.sampled_from([b"", b"x"])),
    st.builds(lambda i, who: Suspect(i, "b", who), INCS, ACCUSERS),
    st.builds(dead_b, INCS),
    st.builds(left_b, INCS),
)
SELF_INCS = st.integers(min_value=0, max_value=WIRE_MAX - 1)
ABOUT_SELF = st.one_of(
    st.builds(lambda i, who: Suspect(i, "a", who), SELF_INCS, ACCUSERS),
    st.builds(lambda i, who: Dead(i, "a", who), SELF_INCS, ACCUSERS),
    st.builds(
        lambda i, addr, meta: Alive(i, "a", addr, meta),
        SELF_INCS,
        st.sampled_from([ADDRS["a"], ("10.0.0.9", 7946)]),
        st.sampled_from([b"", b"restarted"]),
    ),
)
ANY = st.lists(st.one_of(ABOUT_B, ABOUT_SELF), max_size=12)


def oracle(messages: Sequence[Fact]) -> tuple[MemberState, int, bytes | None]:
    """Return "b"'s final state by "newest incarnation wins, the stronger state at a tie"."""
    rank = {MemberState.ALIVE: 0, MemberState.SUSPECT: 1, MemberState.DEAD: 2, MemberState.LEFT: 2}
    best = (1, 0, MemberState.ALIVE)
    for msg in messages:
        if isinstance(msg, Alive):
            state = MemberState.ALIVE
        elif isinstance(msg, Suspect):
            state = MemberState.SUSPECT
        else:
            state = MemberState.LEFT if msg.accuser == msg.node else MemberState.DEAD
        best = max(best, (msg.incarnation, rank[state], state))
    inc, _, state = best
    return state, inc, meta_of(inc) if state == MemberState.ALIVE else None


# ---- order independence ----


@SETTINGS
@given(alives_and_one_accusation().flatmap(lambda ms: st.tuples(st.just(ms), st.permutations(ms))))
def test_alive_messages_and_one_accusation_merge_to_the_newest_incarnation_in_any_order(
    case: tuple[list[Fact], list[Fact]],
) -> None:
    messages, shuffled = case
    first, second = apply(node(), messages), apply(node(), shuffled)
    # Suspect and dead take an incarnation but not its metadata: compare metadata when alive.
    assert verdicts(first) == verdicts(second)
    state, inc, meta = oracle(messages)
    assert row(first, "b") == (state, inc)
    if meta is not None:
        assert first.member("b").meta == meta  # type: ignore[union-attr]


S, D, L, A = Suspect, dead_b, left_b, alive_b
FIRST_VERDICT_STICKS = {
    # memberlist suspectNode/deadNode: a member already suspect or dead keeps the incarnation of
    # the first verdict, so a later alive at the incarnation of a second verdict revives it.
    "suspect_then_newer_suspect": ([S(2, "b", "c"), S(3, "b", "d"), A(3)], MemberState.ALIVE),
    "newer_suspect_first": ([S(3, "b", "d"), S(2, "b", "c"), A(3)], MemberState.SUSPECT),
    "dead_then_newer_dead": ([D(2), D(3), A(3)], MemberState.ALIVE),
    "newer_dead_first": ([D(3), D(2), A(3)], MemberState.DEAD),
    "dead_then_newer_suspect": ([D(2), S(3, "b", "c")], MemberState.DEAD),
    "newer_suspect_then_dead": ([S(3, "b", "c"), D(2)], MemberState.SUSPECT),
    "dead_then_left": ([D(2), L(2)], MemberState.DEAD),
    "left_then_dead": ([L(2), D(2)], MemberState.LEFT),
    # Redelivered (gossip retransmits), the ignored suspicion lands: suspect at 2 the second time.
    "suspect_ignored_while_dead": ([D(1), S(2, "b", "c"), A(2)], MemberState.ALIVE),
    "and_replayed": ([D(1), S(2, "b", "c"), A(2)] * 2, MemberState.SUSPECT),
}


@pytest.mark.parametrize(
    ("messages", "state"), FIRST_VERDICT_STICKS.values(), ids=FIRST_VERDICT_STICKS.keys()
)
def test_with_several_accusations_the_first_verdict_sticks_as_in_memberlist(
    messages: list[Fact], state: MemberState
) -> None:
    assert row(apply(node(), messages), "b")[0] == state


# ---- rules that hold for any sequence ----


@SETTINGS
@given(ANY)
def test_a_message_delivered_twice_in_a_row_changes_nothing_the_second_time(
    messages: list[Fact],
) -> None:
    m = node()
    for msg in messages:
        apply(m, [msg])
        once, inc = table(m), m.incarnation
        apply(m, [msg])
        assert (table(m), m.incarnation) == (once, inc), msg


ONE_ACCUSATION_OF_B = st.tuples(
    alives_and_one_accusation(), st.lists(ABOUT_SELF, max_size=4)
).flatmap(lambda c: st.permutations([*c[0], *c[1]]))


@SETTINGS
@given(ONE_ACCUSATION_OF_B)
def test_a_whole_sequence_replayed_changes_nothing(messages: list[Fact]) -> None:
    # With several accusations of one member a replay can differ: see FIRST_VERDICT_STICKS.
    m = apply(node(), messages)
    once, inc = table(m), m.incarnation
    apply(m, messages)
    assert (table(m), m.incarnation) == (once, inc)


@SETTINGS
@given(ANY)
def test_incarnations_never_go_backwards(messages: list[Fact]) -> None:
    m = node()
    for msg in messages:
        before = {v.name: v.incarnation for v in m.members()}
        apply(m, [msg])
        for v in m.members():
            assert v.incarnation >= before[v.name], (msg, v)


@SETTINGS
@given(ANY)
def test_a_dead_or_left_member_comes_back_only_with_a_newer_alive(messages: list[Fact]) -> None:
    m = node()
    for msg in messages:
        state, inc = row(m, "b")
        apply(m, [msg])
        if state not in (MemberState.DEAD, MemberState.LEFT):
            continue
        newer_alive = isinstance(msg, Alive) and msg.node == "b" and msg.incarnation > inc
        if newer_alive:
            assert row(m, "b") == (MemberState.ALIVE, msg.incarnation)
        else:
            assert row(m, "b") == (state, inc), msg  # suspect, older alive, second death: no-op


@SETTINGS
@given(ANY)
def test_messages_alone_never_declare_a_member_dead_that_no_one_declared_dead(
    messages: list[Fact],
) -> None:
    # Only a Dead message (or our own suspicion timer, which never runs here) kills.
    m = node()
    for msg in messages:
        was = row(m, "b")[0]
        apply(m, [msg])
        if row(m, "b")[0] == MemberState.DEAD and was != MemberState.DEAD:
            assert isinstance(msg, Dead) and msg.node == "b" and msg.accuser != "b"


# ---- refutation ----


@SETTINGS
@given(ANY)
def test_a_node_refutes_every_accusation_of_itself_with_a_higher_incarnation(
    messages: list[Fact],
) -> None:
    m = node()
    for msg in messages:
        before = m.incarnation
        apply(m, [msg])
        local = m.member("a")
        assert local is not None and local.state == MemberState.ALIVE
        if msg.node != "a":
            assert m.incarnation == before
            continue
        if isinstance(msg, Alive):
            # Someone speaks for us: only our own current record may stand unrefuted.
            same = msg.incarnation == m.incarnation and (msg.meta, msg.addr) == (b"", ADDRS["a"])
            assert m.incarnation > msg.incarnation or same
            assert same or m.incarnation > before or msg.incarnation < before
        else:
            assert m.incarnation > msg.incarnation
        if m.incarnation > before:  # a refutation went out: our alive at the new incarnation
            pending = [x for _, x, _ in m.broadcasts.pending()]
            assert Alive(m.incarnation, "a", ADDRS["a"], b"") in pending


@SETTINGS
@given(ANY)
def test_the_state_after_any_accusation_still_encodes(messages: list[Fact]) -> None:
    m = apply(node(), messages)
    state = PushPull(False, True, "a", tuple(m.local_state()))
    packet = codec.encode_packet([state], Keyring(()), 1 << 20)
    assert codec.decode_packet(packet, Keyring(()), 1 << 20) == [state]


@pytest.mark.parametrize("accusation", ["suspect", "dead", "alive"])
def test_an_accusation_at_the_largest_wire_incarnation_leaves_a_node_that_can_still_speak(
    accusation: str,
) -> None:
    m = node()
    accusations: dict[str, Fact] = {
        "suspect": Suspect(WIRE_MAX, "a", "c"),
        "dead": Dead(WIRE_MAX, "a", "c"),
        "alive": Alive(WIRE_MAX, "a", ADDRS["a"], b"impostor"),
    }
    msg = accusations[accusation]
    # The accusation arrives as any peer's would: decoded from a signed packet.
    key = Keyring((b"k" * 32,))
    decoded = codec.decode_packet(codec.encode_packet([msg], key, 1400), key, 1400)
    assert decoded == [msg]
    apply(m, decoded)
    assert row(m, "a")[0] == MemberState.ALIVE
    codec.encode_packet([PushPull(False, True, "a", tuple(m.local_state()))], key, 1 << 20)


# ---- push-pull ----

RECORDS = st.lists(
    st.builds(
        PushNodeState,
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(list(ADDRS.values())),
        INCS,
        st.sampled_from([int(s) for s in MemberState]),
        st.sampled_from([b"", b"x"]),
    ),
    max_size=3,
    unique_by=lambda r: r.name,  # a push-pull carries one record per member
)


@SETTINGS
@given(RECORDS)
def test_a_push_pull_never_kills_a_member_and_a_left_record_means_left(
    records: list[PushNodeState],
) -> None:
    m = node()
    m.handle(PushPull(False, True, "c", tuple(records)), ADDRS["c"], NOW)
    for v in m.members():
        assert v.state != MemberState.DEAD, v  # a remote "dead" only makes us suspect
        if v.name == "a":
            assert v.state == MemberState.ALIVE
            assert all(r.incarnation < v.incarnation for r in records if r.name == "a" and r.state)
    for r in records:
        if r.name == "b" and r.state == MemberState.LEFT and r.incarnation >= 1:
            assert row(m, "b")[0] in (MemberState.LEFT, MemberState.DEAD)
