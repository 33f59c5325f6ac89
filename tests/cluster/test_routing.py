"""Routing and placement decisions from gossiped metadata: table tests."""

from __future__ import annotations

import pytest

from cluster.messages import MemberState
from cluster.meta import DeviceMeta, ModelMeta, NodeMeta
from cluster.routing import (
    ClusterMember,
    LoadTarget,
    Route,
    RouteKind,
    choose_load_target,
    claimed_primary,
    holders,
    loading_on,
    route,
)

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


def node(
    name: str,
    *,
    state: MemberState = A,
    loaded: dict[str, int] | None = None,
    loading: tuple[str, ...] = (),
    free: tuple[int, ...] = (1000,),
    leaving: bool = False,
    meta: bool = True,
    term: int = 0,
) -> ClusterMember:
    m = NodeMeta(
        devices=tuple(DeviceMeta(f"cuda:{i}", 24000, f, 0) for i, f in enumerate(free)),
        loaded=tuple(ModelMeta(k, q) for k, q in (loaded or {}).items()),
        loading=loading,
        leaving=leaving,
        primary_term=term,
    )
    return ClusterMember(name, ("127.0.0.1", 7946), state, 1, m if meta else None)


@pytest.mark.parametrize(
    ("members", "exclude", "expected"),
    [
        ([node("a"), node("b")], None, []),
        ([node("a", loaded={"m": 0}), node("b", loaded={"x": 0})], None, ["a"]),
        ([node("a", loaded={"m": 3}), node("b", loaded={"m": 1})], None, ["b", "a"]),
        (
            [node("a", loaded={"m": 1}, free=(100,)), node("b", loaded={"m": 1}, free=(900,))],
            None,
            ["b", "a"],
        ),
        ([node("b", loaded={"m": 0}), node("a", loaded={"m": 0})], None, ["a", "b"]),
        (
            [
                node("a", loaded={"m": 0}, state=S),
                node("b", loaded={"m": 0}, state=D),
                node("c", loaded={"m": 0}, state=L),
                node("d", loaded={"m": 0}, leaving=True),
                node("e", meta=False),
                node("f", loaded={"m": 5}),
            ],
            None,
            ["f"],
        ),
        ([node("a", loaded={"m": 0}), node("b", loaded={"m": 2})], "a", ["b"]),
    ],
    ids=[
        "nobody",
        "one-holder",
        "shorter-queue-first",
        "then-more-free-memory",
        "then-by-name",
        "only-alive-and-not-leaving",
        "excluding-the-local-node",
    ],
)
def test_holders(members: list[ClusterMember], exclude: str | None, expected: list[str]) -> None:
    assert holders(members, "m", exclude=exclude) == expected


def test_loading_on_lists_alive_members_loading_the_model_by_name() -> None:
    members = [
        node("c", loading=("m",)),
        node("a", loading=("m", "x")),
        node("b", loading=("m",), state=D),
        node("d", loading=("x",)),
    ]
    assert loading_on(members, "m") == ["a", "c"]


@pytest.mark.parametrize(
    ("need", "members", "has_file", "expected"),
    [
        (500, [], None, None),
        (
            500,
            [node("a", free=(400,)), node("b", free=(600,))],
            None,
            LoadTarget("b", "cuda:0", 600),
        ),
        (500, [node("a", free=(300, 300))], None, None),
        (
            500,
            [node("a", free=(600,)), node("b", free=(100, 900))],
            None,
            LoadTarget("b", "cuda:1", 900),
        ),
        (
            500,
            [node("a", free=(600,)), node("b", free=(900,))],
            lambda n: n == "a",
            LoadTarget("a", "cuda:0", 600),
        ),
        (500, [node("a", free=(600,))], lambda n: False, None),
        (
            500,
            [node("b", free=(700,)), node("a", free=(700,))],
            None,
            LoadTarget("a", "cuda:0", 700),
        ),
        (
            500,
            [node("a", free=(900,), leaving=True), node("b", free=(900,), state=S), node("c")],
            None,
            LoadTarget("c", "cuda:0", 1000),
        ),
        (1000, [node("a", free=(1000,))], None, LoadTarget("a", "cuda:0", 1000)),
    ],
    ids=[
        "no-members",
        "most-free-that-fits",
        "never-split-across-devices",
        "best-single-device-anywhere",
        "only-nodes-with-the-file",
        "no-node-has-the-file",
        "tie-goes-to-lower-name",
        "skip-leaving-and-suspect",
        "exact-fit",
    ],
)
def test_choose_load_target(
    need: int,
    members: list[ClusterMember],
    has_file: object,
    expected: LoadTarget | None,
) -> None:
    assert choose_load_target(need, members, has_file) == expected  # type: ignore[arg-type]


def test_choose_load_target_can_exclude_nodes() -> None:
    members = [node("a", free=(900,)), node("b", free=(800,))]
    assert choose_load_target(500, members, exclude={"a"}) == LoadTarget("b", "cuda:0", 800)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (
            [node("me", loaded={"m": 9}), node("b", loaded={"m": 0})],
            Route(RouteKind.LOCAL, ("me",)),
        ),
        (
            [node("me"), node("b", loaded={"m": 2}), node("c", loaded={"m": 0})],
            Route(RouteKind.FORWARD, ("c", "b")),
        ),
        ([node("me"), node("b", loading=("m",))], Route(RouteKind.WAIT, ("b",))),
        ([node("me"), node("b")], Route(RouteKind.LOAD)),
        ([node("me", loaded={"m": 0}, leaving=True)], Route(RouteKind.LOCAL, ("me",))),
    ],
    ids=[
        "local",
        "forward-least-loaded",
        "wait-for-a-load",
        "ask-the-primary",
        "local-while-draining",
    ],
)
def test_route(members: list[ClusterMember], expected: Route) -> None:
    assert route(members, "m", "me") == expected


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([node("a"), node("b")], None),
        ([node("a"), node("b", term=3)], ("b", 3)),
        ([node("b", term=3), node("c", term=5)], ("c", 5)),
        ([node("c", term=5), node("b", term=5)], ("c", 5)),
        ([node("me", term=9), node("b", term=2)], ("b", 2)),
        ([node("b", term=7, state=S), node("c", term=7, state=D), node("d", term=1)], ("d", 1)),
        ([node("b", meta=False)], None),
    ],
    ids=[
        "no claim",
        "one claim",
        "the highest term wins",
        "a tie goes to the member met first",
        "this node's own metadata is not a claim",
        "only alive members count",
        "no metadata, no claim",
    ],
)
def test_the_claimed_primary_is_the_alive_peer_with_the_highest_term(
    members: list[ClusterMember], expected: tuple[str, int] | None
) -> None:
    assert claimed_primary(members, "me") == expected
