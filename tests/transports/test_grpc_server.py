"""The gRPC server's own bounds and refusals, against the fake node: its pending bound, the
node's refusals as status codes with a retry hint, a port in use."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from actors.errors import CircuitOpen, ShuttingDown
from tests.transports.conftest import FakeNode, metric, server_config
from transports.grpc_gen import modelops_pb2 as pb
from transports.grpc_gen import modelops_pb2_grpc as pb_grpc
from transports.grpc_server import GrpcServer

REQUEST = pb.InferenceRequest(model_name="tiny", input_text="hi", max_tokens=2)

Start = Callable[..., Awaitable[tuple[GrpcServer, Any]]]


@pytest.fixture(name="start")
async def start_fixture() -> AsyncIterator[Start]:
    """Start GrpcServers on `node` with config overrides; return each with a stub."""
    opened: list[tuple[GrpcServer, grpc.aio.Channel]] = []

    async def start(node: FakeNode, **overrides: Any) -> tuple[GrpcServer, Any]:
        server = GrpcServer(node, server_config(**overrides))
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        opened.append((server, channel))
        return server, pb_grpc.ModelOpsStub(channel)

    yield start
    for server, channel in opened:
        await channel.close()
        await server.stop()


async def test_past_max_workers_and_max_pending_a_call_is_refused_at_once_with_a_retry_hint(
    node: FakeNode, start: Start
) -> None:
    node.gate = asyncio.Event()  # the first inference holds the only worker slot
    _, stub = await start(node, max_workers=1, max_pending=0)
    refused = metric("moc_grpc_requests_total", method="Infer", outcome="overloaded")
    first = stub.Infer(REQUEST)
    await asyncio.wait_for(node.started.wait(), 5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Infer(REQUEST)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "too many gRPC requests in progress"
    assert dict(info.value.trailing_metadata())["retry-after"] == "1"
    assert metric("moc_grpc_requests_total", method="Infer", outcome="overloaded") == refused + 1
    node.gate.set()
    assert (await first).tokens_generated == 2


@pytest.mark.parametrize(
    ("error", "code"),
    [(ShuttingDown("the node is draining"), "shutting_down"), (CircuitOpen("open"), "circuit_open")],
    ids=["draining", "breaker open"],
)
async def test_a_draining_node_or_an_open_breaker_is_unavailable_with_a_retry_hint(
    node: FakeNode, start: Start, error: Exception, code: str
) -> None:
    node.fail = error
    _, stub = await start(node)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Infer(REQUEST)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(info.value.trailing_metadata())
    assert trailers["moc-error-code"] == code
    assert float(trailers["retry-after"]) > 0


async def test_a_port_in_use_fails_the_start_with_its_errno(node: FakeNode) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = GrpcServer(node, server_config(grpc_port=holder.getsockname()[1]))
        with pytest.raises(OSError) as info:
            await server.start()
    assert info.value.errno == errno.EADDRINUSE
