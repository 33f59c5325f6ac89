"""Embeddings across the cluster: two real node processes on loopback, the model on one.

POST /v1/embeddings on a node that does not hold the model is forwarded over the peer RPC to
the node that does, as an inference is, and answers with that node's vectors.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.moc_node.cluster_procs import NodeProc, holders, start_cluster, wait_until

NAMES = ("node-a", "node-b")
INPUTS = ["hello world", "a second input"]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[NodeProc, NodeProc]]:
    with start_cluster(tmp_path, names=NAMES) as nodes:  # all ports from one free_ports call
        yield nodes["node-a"], nodes["node-b"]


def peer_embeds_served(node: NodeProc) -> float:
    """Return the node's count of embeddings it served for its peers."""
    with_labels = 'moc_peer_requests_total{op="embed",outcome="success"} '
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    lines = [line for line in text.splitlines() if line.startswith(with_labels)]
    return float(lines[0].split()[-1]) if lines else 0.0


def test_embeddings_asked_of_a_node_without_the_model_come_from_the_holder(
    pair: tuple[NodeProc, NodeProc],
) -> None:
    a, b = pair
    status, body = b.post("/models", {"model_name": "m"})
    assert status == 201, body
    wait_until(
        lambda: a.get("/cluster")["models"].get("m") == ["node-b"], 30, "b gossiped as m's holder"
    )

    status, forwarded = a.post("/v1/embeddings", {"model": "m", "input": INPUTS})
    assert status == 200, forwarded
    status, direct = b.post("/v1/embeddings", {"model": "m", "input": INPUTS})
    assert status == 200, direct

    assert [d["embedding"] for d in forwarded["data"]] == [d["embedding"] for d in direct["data"]]
    assert len(forwarded["data"]) == len(INPUTS) and len(forwarded["data"][0]["embedding"]) == 64
    assert forwarded["usage"] == direct["usage"]
    assert peer_embeds_served(b) == 1  # a's request went over the peer RPC, once
    assert holders({"a": a, "b": b}, "m") == {"node-b"}  # and a loaded nothing
