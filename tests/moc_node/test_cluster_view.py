"""The /cluster document of a clustered node, built from the members it sees (pure)."""

from __future__ import annotations

from cluster.messages import MemberState
from cluster.meta import DeviceMeta, ModelMeta, NodeMeta
from cluster.routing import ClusterMember
from moc_node.clustered.view import cluster_document, member_json


def member(
    name: str,
    loaded: tuple[str, ...] = (),
    loading: tuple[str, ...] = (),
    state: MemberState = MemberState.ALIVE,
    leaving: bool = False,
) -> ClusterMember:
    meta = NodeMeta(
        devices=(DeviceMeta("cuda:0", 8000, 6000, 1000),),
        loaded=tuple(ModelMeta(m, 2) for m in loaded),
        loading=loading,
        http=f"{name}:8080",
        generation=3,
        leaving=leaving,
    )
    return ClusterMember(name, ("10.0.0.1", 7946), state, 4, meta)


def test_each_model_lists_its_holders_in_member_name_order() -> None:
    members = [member("c", loaded=("m",)), member("a", loaded=("m", "n")), member("b")]
    doc = cluster_document(members, me="a", primary=("b", 7), term=7, dropped={})
    assert [m["name"] for m in doc["members"]] == ["a", "b", "c"]
    assert doc["models"] == {"m": ["a", "c"], "n": ["a"]}
    assert doc["primary"] == {"name": "b", "term": 7}
    assert (doc["enabled"], doc["self"], doc["term"]) == (True, "a", 7)


def test_without_a_primary_the_document_says_none() -> None:
    doc = cluster_document([member("a")], me="a", primary=None, term=0, dropped={"bad_mac": 2})
    assert doc["primary"] is None
    assert doc["dropped"] == {"bad_mac": 2}


def test_a_loading_model_is_listed_but_has_no_holder_yet() -> None:
    doc = cluster_document([member("a", loading=("m",))], me="a", primary=None, term=0, dropped={})
    assert doc["members"][0]["models"] == [{"name": "m", "state": "loading", "queued": 0}]
    assert doc["models"] == {}


def test_an_alive_member_that_announced_its_leave_is_shown_leaving() -> None:
    assert member_json(member("a", leaving=True))["state"] == "leaving"
    assert member_json(member("a", state=MemberState.SUSPECT, leaving=True))["state"] == "suspect"


def test_a_member_lists_its_devices_with_the_memory_in_use() -> None:
    doc = member_json(member("a", loaded=("m",)))
    assert doc["devices"] == [
        {"name": "cuda:0", "total_mb": 8000, "free_mb": 6000, "claimed_mb": 1000, "used_mb": 2000}
    ]
    assert doc["models"] == [{"name": "m", "state": "loaded", "queued": 2}]
    assert (doc["address"], doc["generation"], doc["http"]) == ("10.0.0.1:7946", 3, "a:8080")


def test_a_member_whose_metadata_is_not_known_yet_has_no_devices_or_models() -> None:
    bare = ClusterMember("x", ("10.0.0.2", 7946), MemberState.ALIVE, 1, None)
    doc = member_json(bare)
    assert (doc["devices"], doc["models"], doc["generation"]) == ([], [], None)
