"""A holder that never acknowledges is replaced by the next holder (in one process, real sockets),
for an inference, a stream and an embedding alike.

Three members gossip over real UDP/TCP on loopback: the requester (a real ClusterLink and
Forwarder, serving nothing itself), holder
node-b, whose advertised peer port is a ROUTER socket that swallows every request, and holder
node-c, a real PeerServer. node-b sorts first (same load, lower name), so it is tried first.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import pytest
import zmq
import zmq.asyncio

from actors.types import (
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from cluster.config import local
from cluster.election import MemoryTermStore
from cluster.keyring import Keyring
from cluster.meta import ModelMeta, NodeMeta
from cluster.routing import holders
from cluster.runner import ClusterRunner
from moc_node.clustered.forwarding import Forwarder, forward_retries_total
from moc_node.clustered.link import ClusterLink
from tests.support import wait_for
from transports.peer import PeerServer

KEY = Keyring((b"forward-failover-test-key-012345",))
CONFIG = dataclasses.replace(local(), bind="127.0.0.1:0", peer_port=0)
REQUEST_TIMEOUT = 30.0


class NothingHere:
    """The requester's own serving: it holds nothing, so nothing may be served here."""

    async def infer(self, req: InferRequest) -> InferResult:
        raise AssertionError("the requester holds nothing")

    async def infer_stream(
        self, req: InferRequest
    ) -> AsyncGenerator[TokenChunk | InferResult, None]:
        raise AssertionError("the requester holds nothing")
        yield  # an async generator, as the Protocol says

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        raise AssertionError("the requester holds nothing")


async def nowhere(model: str) -> str:
    raise AssertionError("nothing is placed in this test")


class Holder:
    """node-c's peer handler: serves model "m" and says who served it."""

    async def peer_infer(self, req: InferRequest) -> InferResult:
        return InferResult("served by node-c", 1, 1, "length", 1.0, "v1")

    async def peer_infer_stream(
        self, req: InferRequest
    ) -> AsyncGenerator[TokenChunk | InferResult, None]:
        yield TokenChunk("served ")
        yield InferResult("served by node-c", 2, 1, "length", 1.0, "v1")

    async def peer_embed(self, req: EmbedRequest) -> EmbedResult:
        return EmbedResult((b"node-c",), 1, 1.0, "v1")

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo:
        raise AssertionError("nothing is placed in this test")

    async def peer_place(self, model: str) -> str:
        raise AssertionError("nothing is placed in this test")

    async def peer_restore(self, model: str, node: str) -> str:
        raise AssertionError("nothing is restored in this test")


@dataclass
class Cluster:
    link: ClusterLink
    forwarder: Forwarder
    hole: zmq.asyncio.Socket
    """node-b's advertised peer endpoint: receives requests, never answers."""


def advertising(peer_port: int) -> NodeMeta:
    return NodeMeta(loaded=(ModelMeta("m"),), peer=f"127.0.0.1:{peer_port}")


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    hole = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    hole.setsockopt(zmq.LINGER, 0)
    hole_port = hole.bind_to_random_port("tcp://127.0.0.1")
    server = PeerServer(Holder(), KEY, name="node-c", host="127.0.0.1", port=0)
    await server.start()
    b = ClusterRunner(CONFIG, "node-b", KEY, MemoryTermStore(), lambda: advertising(hole_port))
    await b.start()
    seed = (f"{b.addr[0]}:{b.addr[1]}",)
    c = ClusterRunner(
        dataclasses.replace(CONFIG, seeds=seed),
        "node-c",
        KEY,
        MemoryTermStore(),
        lambda: advertising(server.port),
    )
    await c.start()
    link = ClusterLink(
        dataclasses.replace(CONFIG, seeds=seed),
        name="node-a",
        keyring=KEY,
        term_store=MemoryTermStore(),
        meta=NodeMeta,  # holds nothing, advertises nothing
        request_timeout=REQUEST_TIMEOUT,
    )
    await link.start()
    try:
        await wait_for(
            lambda: holders(link.runner.members(), "m", exclude="node-a") == ["node-b", "node-c"],
            15,
            "both holders gossiped, node-b first",
        )
        yield Cluster(link, Forwarder(link, NothingHere(), nowhere), hole)
    finally:
        await link.stop()
        await c.stop()
        await b.stop()
        await server.stop()
        hole.close(linger=0)


def retries(mode: str) -> float:
    return forward_retries_total.labels(mode)._value.get()  # type: ignore[no-any-return]


def request() -> InferRequest:
    return InferRequest(model="m", prompt="hi", params=GenerationParams(max_tokens=1))


async def swallowed(hole: zmq.asyncio.Socket) -> int:
    """Return how many requests the silent holder received (and never answered)."""
    count = 0
    while await hole.poll(0):
        await hole.recv_multipart()
        count += 1
    return count


async def test_a_holder_that_never_acknowledges_is_replaced_by_the_next(cluster: Cluster) -> None:
    before = retries("infer")
    loop = asyncio.get_running_loop()
    began = loop.time()
    result = await cluster.forwarder.infer(request())
    elapsed = loop.time() - began
    assert result.text == "served by node-c"
    assert retries("infer") == before + 1
    assert await swallowed(cluster.hole) == 1  # node-b was asked first, and only once
    ack_timeout = cluster.link.client.ack_timeout
    assert elapsed >= ack_timeout  # it gave node-b its ack timeout, then moved on
    assert elapsed < REQUEST_TIMEOUT  # long before the request's own timeout


async def test_a_stream_whose_holder_never_acknowledges_comes_from_the_next(
    cluster: Cluster,
) -> None:
    before = retries("stream")
    items = [i async for i in cluster.forwarder.stream(request())]
    assert [i.text for i in items] == ["served ", "served by node-c"]
    assert retries("stream") == before + 1
    assert await swallowed(cluster.hole) == 1


async def test_an_embedding_whose_holder_never_acknowledges_comes_from_the_next(
    cluster: Cluster,
) -> None:
    before = retries("embed")
    result = await cluster.forwarder.embed(EmbedRequest("m", ("hi",)))
    assert result.vectors == (b"node-c",)
    assert retries("embed") == before + 1
    assert await swallowed(cluster.hole) == 1  # node-b was asked first, and only once
