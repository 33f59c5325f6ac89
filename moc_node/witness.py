"""The witness: a cluster member that only gossips and votes (`moc-node run --witness`).

The third voter of a two-host cluster, so that one host plus the witness keep a majority
through a partition. It serves no client and holds no model.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import prometheus_client

from actors.serving.store import StateStore
from cluster.keyring import Keyring
from cluster.runner import ClusterRunner
from moc_node.config import Config
from moc_node.preflight import listen, listener
from moc_node.sdnotify import Notifier
from moc_node.term_store import TermStore

log = logging.getLogger(__name__)


async def serve_witness(config: Config, keyring: Keyring) -> int:
    """Run only a voter: it gossips and votes in elections, never serves or holds models.

    The third voter of a two-host cluster, so that one host plus the witness keep a majority
    through a partition (see README, "Partitions").
    """
    name = config.cluster.name or config.node.name
    if name not in config.cluster.voters:
        log.warning("witness %s is not in [cluster] voters: it will not vote", name)
    if not keyring.enabled:
        log.warning("cluster without key_file: gossip and peer RPC are NOT authenticated")
    store = StateStore(config.node.state_path / "witness.db")
    runner = ClusterRunner(
        config.cluster,
        name,
        keyring,
        TermStore(store),
        registry=prometheus_client.REGISTRY,
    )
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await listen(listener(config, "cluster.bind"), runner.start)
        notifier.ready(f"witness {name} voting")
        log.info("witness %s voting in the cluster", name)
        await stop.wait()
        notifier.stopping()
        await runner.leave(timeout=2.0)
    finally:
        await runner.stop()
        store.close()
        notifier.close()
    return 0


__all__ = ["serve_witness"]
