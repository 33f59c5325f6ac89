"""Three real node processes on loopback form one cluster and route requests to each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.moc_node.cluster_procs import (
    NAMES,
    NodeProc,
    alive,
    complete,
    holders,
    start_cluster,
    wait_until,
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, NodeProc]]:
    with start_cluster(tmp_path) as nodes:
        yield nodes


def test_three_nodes_elect_one_primary_and_place_a_model_once(cluster: dict[str, NodeProc]) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(lambda: all(alive(n.get("/cluster")) == set(NAMES) for n in (a, b, c)), 30, "3 alive members")
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in (a, b, c)), 30, "a primary")
    primaries = {n.get("/cluster")["primary"]["name"] for n in (a, b, c)}
    assert len(primaries) == 1

    status, body = complete(b)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4
    assert len(holders(cluster, "m")) == 1  # one load cluster-wide, whoever asked

    for node in (a, b, c):  # every node serves it: locally or forwarded to the holder
        status, body = complete(node)
        assert status == 200, body
    assert len(holders(cluster, "m")) == 1

    (holder,) = holders(cluster, "m")
    wait_until(lambda: all(n.get("/cluster")["models"].get("m") == [holder] for n in (a, b, c)), 10, "gossiped holder")


def test_when_the_holder_dies_the_model_is_placed_again_elsewhere(cluster: dict[str, NodeProc]) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in (a, b, c)), 30, "a primary")
    status, _ = complete(a)
    assert status == 200
    (holder,) = holders(cluster, "m")
    cluster[holder].proc.kill()
    cluster[holder].proc.wait()
    survivors = [n for n in (a, b, c) if n.name != holder]
    wait_until(lambda: all(holder not in alive(n.get("/cluster")) for n in survivors), 30, "death detected")
    wait_until(lambda: complete(survivors[0])[0] == 200, 30, "served again")
    assert len(holders(cluster, "m")) == 1
    assert holder not in holders(cluster, "m")
