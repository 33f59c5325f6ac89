"""Seeds whose names do not resolve yet: the runner keeps resolving them (tenacity, with
backoff) and joins through them once they do, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator

import pytest

from cluster.election import MemoryTermStore
from cluster.messages import Address
from cluster.runner import ClusterRunner
from tests.cluster.test_runner import KEY, LOCAL, Cluster, alive
from tests.support import wait_for


class LateDns:
    """A resolver for one name that fails (as getaddrinfo does) until `publish` is called."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.address: Address | None = None
        self.asked = 0

    def publish(self, address: Address) -> None:
        self.address = address

    async def __call__(self, host: str, port: int) -> Address:
        self.asked += 1
        if host != self.name or self.address is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.address[0], port


@pytest.fixture
async def gossip() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


def resolving_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if "_resolve_later" in repr(t.get_coro())]


async def test_a_seed_that_resolves_late_is_joined_once_it_resolves(gossip: Cluster) -> None:
    first = await gossip.add("node-a")
    dns = LateDns("node-a.cluster.test")
    config = dataclasses.replace(LOCAL, seeds=(f"node-a.cluster.test:{first.addr[1]}",))
    late = ClusterRunner(config, "node-b", KEY, MemoryTermStore(), resolve=dns)
    await late.start()
    try:
        await wait_for(lambda: dns.asked >= 3, 10, "a few tries to resolve the seed")
        assert alive(late) == {"node-b"}
        dns.publish(first.addr)
        await wait_for(lambda: alive(late) == alive(first) == {"node-a", "node-b"}, 10, "joined")
        assert resolving_tasks() == []  # resolved: nothing keeps asking
    finally:
        await late.stop()


async def test_a_runner_stopped_while_a_seed_is_unresolved_stops_trying() -> None:
    dns = LateDns("never.cluster.test")
    config = dataclasses.replace(LOCAL, seeds=("never.cluster.test:7946",))
    runner = ClusterRunner(config, "alone", KEY, MemoryTermStore(), resolve=dns)
    await runner.start()
    await wait_for(lambda: dns.asked >= 2, 10, "a retry")
    assert len(resolving_tasks()) == 1
    await runner.stop()
    assert resolving_tasks() == []
