"""Three real node processes on loopback form one cluster, route requests to each other, and
survive a holder's kill -9 and restart without holding a model twice."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.keyring import Keyring
from tests.moc_node.cluster_procs import (
    KEY,
    NAMES,
    NodeProc,
    alive,
    complete,
    holders,
    start_cluster,
    wait_ready,
    wait_until,
)
from transports.peer import PeerAddress, PeerClient


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, NodeProc]]:
    with start_cluster(tmp_path) as nodes:
        yield nodes


def test_three_nodes_elect_one_primary_and_place_a_model_once(cluster: dict[str, NodeProc]) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(
        lambda: all(alive(n.get("/cluster")) == set(NAMES) for n in (a, b, c)),
        30,
        "3 alive members",
    )
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
    wait_until(
        lambda: all(n.get("/cluster")["models"].get("m") == [holder] for n in (a, b, c)),
        10,
        "gossiped holder",
    )


def test_a_model_no_node_knows_is_not_found_wherever_it_is_asked(
    cluster: dict[str, NodeProc],
) -> None:
    # The primary asks every node to load it; each says "not found", and so does the client's
    # answer (not "insufficient memory", as when the nodes ran out without saying why).
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in cluster.values()), 30, "primary")
    for node in cluster.values():
        status, body = complete(node, "no-such-model")
        assert status == 404, body
        assert body["error"]["code"] == "model_not_found"
        assert "not known to any node" in body["error"]["message"]
    assert not holders(cluster, "no-such-model")


def test_when_the_holder_dies_the_model_is_placed_again_elsewhere(
    cluster: dict[str, NodeProc],
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in (a, b, c)), 30, "a primary")
    status, _ = complete(a)
    assert status == 200
    (holder,) = holders(cluster, "m")
    cluster[holder].proc.kill()
    cluster[holder].proc.wait()
    survivors = [n for n in (a, b, c) if n.name != holder]
    wait_until(
        lambda: all(holder not in alive(n.get("/cluster")) for n in survivors), 30, "death detected"
    )
    wait_until(lambda: complete(survivors[0])[0] == 200, 30, "served again")
    assert len(holders(cluster, "m")) == 1
    assert holder not in holders(cluster, "m")


def remembered(tmp_path: Path, name: str) -> set[str]:
    """Return the models the node's state file would restore (read-only, safe while it runs)."""
    db = tmp_path / name / "moc-node.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM loaded_models")}


def state_of(node: NodeProc, model: str) -> str | None:
    return {m["name"]: m["state"] for m in node.get("/models")["models"]}.get(model)


def test_a_restarted_holder_leaves_a_re_placed_model_to_its_new_holder(
    cluster: dict[str, NodeProc], tmp_path: Path
) -> None:
    nodes = [cluster[n] for n in NAMES]
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in nodes), 30, "a primary")
    status, body = complete(nodes[0])
    assert status == 200, body
    (first,) = holders(cluster, "m")
    killed = cluster[first]
    killed.proc.kill()  # SIGKILL: no drain, no unload, the state file still lists m
    killed.proc.wait()
    assert "m" in remembered(tmp_path, first)

    survivors = [n for n in nodes if n.name != first]
    wait_until(
        lambda: all(first not in alive(n.get("/cluster")) for n in survivors), 30, "death seen"
    )
    wait_until(lambda: complete(survivors[0])[0] == 200, 30, "m placed again")
    (second,) = holders(cluster, "m")
    assert second != first
    wait_until(
        lambda: all(n.get("/cluster")["models"].get("m") == [second] for n in survivors),
        10,
        "the new holder gossiped",
    )

    killed.restart()
    wait_ready(killed)  # ready only after the restore decision was carried out

    assert holders(cluster, "m") == {second}
    assert state_of(killed, "m") not in ("loaded", "loading")
    assert "m" not in remembered(tmp_path, first)  # forgotten: a later restart skips it too
    status, body = complete(killed)  # and the restarted node forwards to the holder
    assert status == 200, body
    assert holders(cluster, "m") == {second}


def _peer_address(node: NodeProc) -> PeerAddress:
    """The node's peer RPC address, from its config file."""
    assert node.config is not None
    text = node.config.read_text()
    port = next(ln.split("=")[1].strip() for ln in text.splitlines() if ln.startswith("peer_port"))
    return PeerAddress(node.name, f"127.0.0.1:{port}")


async def _ask_restore(address: PeerAddress, model: str, node: str) -> str:
    # Sealed as the restarting node would seal it (the primary answers whoever signs).
    client = PeerClient(Keyring((bytes.fromhex(KEY),)), name=node, ack_timeout=2.0)
    try:
        return await client.restore(address, model, node, timeout=30.0)
    finally:
        client.close()


def test_a_model_the_primary_reserved_for_a_restoring_node_is_placed_nowhere_else(
    cluster: dict[str, NodeProc],
) -> None:
    a = cluster["node-a"]
    wait_until(lambda: a.get("/cluster")["primary"] is not None, 30, "a primary")
    primary = a.get("/cluster")["primary"]["name"]
    restorer, asker = (n for n in NAMES if n != primary)
    address = _peer_address(cluster[primary])

    # A restarting node that remembers m asks first: nobody holds it, so it is the restorer's.
    assert asyncio.run(_ask_restore(address, "m", restorer)) == restorer
    # A request elsewhere meanwhile waits for that restore instead of placing a second copy;
    # this restorer never loads, so after the reservation the client is told to ask again.
    status, body = complete(cluster[asker])
    assert status == 503, body
    assert "did not restore" in body["error"]["message"]
    assert holders(cluster, "m") == set()

    # Reserved again, and this time the restorer loads it: every request goes there.
    assert asyncio.run(_ask_restore(address, "m", restorer)) == restorer
    status, _ = cluster[restorer].post("/models", {"model_name": "m"})
    assert status == 201
    for name in (asker, primary):
        status, body = complete(cluster[name])
        assert status == 200, body
    assert holders(cluster, "m") == {restorer}
