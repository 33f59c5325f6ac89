"""The node is chosen once, at wiring: a LocalNode alone, a ClusteredNode around it in a cluster."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from cluster.config import local
from moc_node.app import Runtime
from moc_node.clustered.node import ClusteredNode
from moc_node.config import Config
from moc_node.node import LocalNode
from tests.moc_node.cluster_procs import free_ports
from tests.moc_node.conftest import make_config

BuildRuntime = Callable[[Config], Runtime]


def clustered(config: Config) -> Config:
    gossip, peer = free_ports(2)
    cluster = dataclasses.replace(
        local(), enabled=True, bind=f"127.0.0.1:{gossip}", peer_port=peer
    )
    return dataclasses.replace(config, cluster=cluster)


async def test_a_node_without_a_cluster_is_its_local_node_and_the_only_member(
    runtime_factory: BuildRuntime, tmp_path: Path
) -> None:
    runtime = runtime_factory(make_config(tmp_path, tmp_path))
    assert isinstance(runtime.node, LocalNode)
    assert runtime.clustered is None
    await runtime.join_cluster(0, 0)  # nothing to join: no socket opens
    await runtime.node.start()
    view = runtime.node.cluster_view()
    assert (view["enabled"], [m["name"] for m in view["members"]]) == (False, ["test-node"])


async def test_a_clustered_node_joins_on_real_sockets_and_describes_the_cluster(
    runtime_factory: BuildRuntime, tmp_path: Path
) -> None:
    runtime = runtime_factory(clustered(make_config(tmp_path, tmp_path)))
    assert isinstance(runtime.node, ClusteredNode)
    assert runtime.clustered is runtime.node
    await runtime.join_cluster(18008, 17211)
    await runtime.node.start()
    assert runtime.node.is_ready()
    view = runtime.node.cluster_view()
    assert (view["enabled"], view["self"]) == (True, "test-node")
    [me] = view["members"]
    assert me["http"] == "127.0.0.1:18008"  # the client ports it was told to advertise
    await runtime.close()
    assert runtime.node.closed
