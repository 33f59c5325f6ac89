"""plan_restore: which remembered models a restarting cluster node loads again (a table)."""

from __future__ import annotations

import pytest

from actors.serving.store import LoadedRecord
from cluster.messages import MemberState
from cluster.meta import ModelMeta, NodeMeta
from cluster.routing import ClusterMember
from moc_node.clustered.restore import RestorePlan, plan_restore

ME = "node-b"


def record(name: str, pinned: bool = False) -> LoadedRecord:
    return LoadedRecord(name, f"/models/{name}.gguf", "gguf", 512, -1, pinned)


def member(
    name: str,
    loaded: tuple[str, ...] = (),
    loading: tuple[str, ...] = (),
    state: MemberState = MemberState.ALIVE,
    leaving: bool = False,
) -> ClusterMember:
    meta = NodeMeta(loaded=tuple(ModelMeta(m) for m in loaded), loading=loading, leaving=leaving)
    return ClusterMember(name, ("127.0.0.1", 7946), state, 1, meta)


CASES = [
    ("alone", [record("m")], [], RestorePlan(("m",), {})),
    (
        "held-by-a-live-peer",
        [record("m")],
        [member("node-c", ("m",))],
        RestorePlan((), {"m": "node-c"}),
    ),
    (
        "being-loaded-by-a-peer",
        [record("m")],
        [member("node-c", loading=("m",))],
        RestorePlan((), {"m": "node-c"}),
    ),
    (
        "pinned-is-restored-anyway",
        [record("m", pinned=True)],
        [member("node-c", ("m",))],
        RestorePlan(("m",), {}),
    ),
    (
        "held-by-a-dead-peer",
        [record("m")],
        [member("node-c", ("m",), state=MemberState.DEAD)],
        RestorePlan(("m",), {}),
    ),
    (
        "held-by-a-suspect-peer",
        [record("m")],
        [member("node-c", ("m",), state=MemberState.SUSPECT)],
        RestorePlan(("m",), {}),
    ),
    (
        "held-by-a-leaving-peer",
        [record("m")],
        [member("node-c", ("m",), leaving=True)],
        RestorePlan(("m",), {}),
    ),
    ("own-stale-entry-ignored", [record("m")], [member(ME, ("m",))], RestorePlan(("m",), {})),
    (
        "only-the-held-one-is-skipped-order-kept",
        [record("x"), record("m"), record("y")],
        [member("node-a"), member("node-c", ("m", "z"))],
        RestorePlan(("x", "y"), {"m": "node-c"}),
    ),
    (
        "two-holders-name-the-first-by-name",
        [record("m")],
        [member("node-d", ("m",)), member("node-a", ("m",))],
        RestorePlan((), {"m": "node-a"}),
    ),
    ("nothing-remembered", [], [member("node-c", ("m",))], RestorePlan((), {})),
]


@pytest.mark.parametrize(
    ("records", "members", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_restarting_node_restores_only_what_no_live_peer_holds(
    records: list[LoadedRecord], members: list[ClusterMember], expected: RestorePlan
) -> None:
    assert plan_restore(records, members, ME) == expected


def test_a_member_without_metadata_holds_nothing() -> None:
    bare = ClusterMember("node-c", ("127.0.0.1", 7946), MemberState.ALIVE, 1, None)
    assert plan_restore([record("m")], [bare], ME) == RestorePlan(("m",), {})
