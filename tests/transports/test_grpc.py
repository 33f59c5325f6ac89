"""The legacy gRPC front against a real Node: a client generated from proto/modelops.proto,
real llama.cpp workers, grpc.aio on loopback.

Every ModelOps method, the stream and its cancellation, the client's deadline, many clients at
once, the keys, and grpc.health.v1 following the node's readiness. Bad input is in
test_grpc_bad_input.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import wait_for
from tests.transports.conftest import metric
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    MODEL,
    RealNode,
    StartNode,
    start_node_fixture,
    tiny_models_fixture,
)
from transports.grpc_gen import modelops_pb2 as pb
from transports.grpc_gen import modelops_pb2_grpc as pb_grpc

KEY = "grpc-key"
AUTH = (("x-api-key", KEY),)
LONG = 2000  # tokens: several seconds of generation on the tiny model
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(name="channel")
async def channel_fixture() -> AsyncIterator[Any]:
    """Open channels to a served node (`await open_(served)`); close them at teardown."""
    opened: list[grpc.aio.Channel] = []

    async def open_(served: RealNode) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(served.grpc_target)
        opened.append(channel)
        return channel

    yield open_
    for channel in opened:
        await channel.close()


def infer_request(**overrides: Any) -> pb.InferenceRequest:
    fields: dict[str, Any] = {
        "model_name": MODEL,
        "input_text": "hello",
        "max_tokens": 4,
        "temperature": 0.0,
    }
    fields.update(overrides)
    return pb.InferenceRequest(**fields)


def grpc_count(method: str, outcome: str) -> float:
    return metric("moc_grpc_requests_total", method=method, outcome=outcome)


async def test_every_modelops_method_answers_a_client_generated_from_the_proto(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node(api_keys=(KEY,))
    stub = pb_grpc.ModelOpsStub(await channel(served))
    counted = grpc_count("Infer", "ok")

    reply = await stub.Infer(infer_request(), metadata=AUTH)
    assert reply.success and reply.error_message == ""
    assert reply.tokens_generated == 4 and reply.output_text
    assert reply.finish_reason == "length" and reply.latency_ms > 0
    assert grpc_count("Infer", "ok") == counted + 1

    listed = await stub.ListModels(empty_pb2.Empty(), metadata=AUTH)
    assert {m.model_name: m.state for m in listed.models} == {MODEL: "loaded"}
    assert not listed.truncated

    path = served.model_root / "b.gguf"
    loaded = await stub.LoadModel(
        pb.ModelLoadRequest(model_name="b", model_path=str(path)), metadata=AUTH
    )
    assert loaded.success and loaded.message == "model b loaded" and loaded.device
    other = await stub.Infer(infer_request(model_name="b"), metadata=AUTH)
    assert other.success and other.tokens_generated == 4

    status = await stub.GetSystemStatus(empty_pb2.Empty(), metadata=AUTH)
    assert status.ready and not status.draining and status.version
    assert {m.model_name for m in status.models} == {MODEL, "b"}
    assert status.devices and status.devices[0].total_mb > 0

    unloaded = await stub.UnloadModel(pb.ModelUnloadRequest(model_name="b"), metadata=AUTH)
    assert unloaded.success and unloaded.message == "model b unloaded"
    listed = await stub.ListModels(empty_pb2.Empty(), metadata=AUTH)
    assert "b" not in {m.model_name for m in listed.models if m.state == "loaded"}

    health = await stub.HealthCheck(empty_pb2.Empty(), metadata=AUTH)
    assert health.status == "healthy" and health.timestamp
    assert health.components and all(c.status for c in health.components.values())


async def test_grpc_infer_answers_the_same_text_as_rest_inference(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    stub = pb_grpc.ModelOpsStub(await channel(served))
    reply = await stub.Infer(infer_request(max_tokens=12, stop_sequences=["zzz"]))
    body = {
        "model_name": MODEL,
        "input_text": "hello",
        "max_tokens": 12,
        "temperature": 0.0,
        "stop_sequences": ["zzz"],
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.url}/inference", json=body) as resp,
    ):
        rest = await resp.json()
    assert reply.output_text == rest["output_text"]
    assert reply.tokens_generated == rest["tokens_generated"] == 12


async def test_infer_stream_yields_the_text_in_pieces_then_the_figures(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    stub = pb_grpc.ModelOpsStub(await channel(served))
    whole = await stub.Infer(infer_request(max_tokens=8))
    chunks = [c async for c in stub.InferStream(infer_request(max_tokens=8))]
    pieces = [c.text for c in chunks[:-1]]
    assert all(c.WhichOneof("item") == "text" for c in chunks[:-1])
    assert "".join(pieces) == whole.output_text
    last = chunks[-1]
    assert last.WhichOneof("item") == "result"
    assert last.result.success and last.result.tokens_generated == 8
    assert last.result.finish_reason == "length"


async def test_fifty_concurrent_clients_are_all_answered(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    stubs = [pb_grpc.ModelOpsStub(await channel(served)) for _ in range(50)]
    replies = await asyncio.gather(
        *(stub.Infer(infer_request(max_tokens=2, input_text=f"client {i}"))
          for i, stub in enumerate(stubs))
    )
    assert [r.tokens_generated for r in replies] == [2] * 50
    assert all(r.success for r in replies)
    await wait_for(lambda: served.in_flight() == 0, timeout=5.0)


async def test_a_client_cancelling_a_stream_mid_way_cancels_the_generation(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    stub = pb_grpc.ModelOpsStub(await channel(served))
    node_cancelled = metric("moc_inference_requests_total", model=MODEL, outcome="cancelled")
    front_cancelled = grpc_count("InferStream", "cancelled")
    tokens_before = metric("moc_inference_tokens_generated_total", model=MODEL)

    call = stub.InferStream(infer_request(max_tokens=LONG))
    first = await call.read()
    assert first.WhichOneof("item") == "text"
    assert served.in_flight() == 1
    call.cancel()

    await wait_for(
        lambda: metric("moc_inference_requests_total", model=MODEL, outcome="cancelled")
        > node_cancelled,
        timeout=30,
        what="the node to count the generation as cancelled",
    )
    await wait_for(lambda: served.in_flight() == 0, timeout=5.0, what="the slot to be freed")
    await wait_for(
        lambda: grpc_count("InferStream", "cancelled") == front_cancelled + 1,
        timeout=5.0,
        what="the front to count the stream as cancelled",
    )
    generated = metric("moc_inference_tokens_generated_total", model=MODEL) - tokens_before
    assert generated < LONG, "the worker generated the whole stream for nobody"
    # The node serves the next client at once.
    assert (await stub.Infer(infer_request(max_tokens=2))).tokens_generated == 2


async def test_a_deadline_shorter_than_the_generation_ends_it_with_deadline_exceeded(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    stub = pb_grpc.ModelOpsStub(await channel(served))
    timeouts = grpc_count("Infer", "timeout")
    (pid,) = [m.pid for m in served.node.models() if m.name == MODEL]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the worker makes no progress: only the deadline can end it
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Infer(infer_request(max_tokens=LONG), timeout=0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(lambda: served.in_flight() == 0, timeout=10.0, what="the slot to be freed")
    await wait_for(lambda: grpc_count("Infer", "timeout") == timeouts + 1, timeout=5.0)
    assert (await stub.Infer(infer_request(max_tokens=2))).tokens_generated == 2


async def test_keys_are_checked_in_either_metadata_form_and_refusals_are_unauthenticated(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node(api_keys=(KEY,))
    stub = pb_grpc.ModelOpsStub(await channel(served))
    refused = grpc_count("ListModels", "unauthorized")
    bearer = (("authorization", f"Bearer {KEY}"),)
    assert (await stub.ListModels(empty_pb2.Empty(), metadata=bearer)).models
    for metadata, details in (
        ((), "missing API key"),
        ((("x-api-key", "wrong"),), "invalid API key"),
        ((("authorization", "Bearer wrong"),), "invalid API key"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListModels(empty_pb2.Empty(), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == details
    assert grpc_count("ListModels", "unauthorized") == refused + 3


async def test_health_check_is_open_but_shows_component_details_only_with_a_key(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node(api_keys=(KEY,))
    stub = pb_grpc.ModelOpsStub(await channel(served))
    anonymous = await stub.HealthCheck(empty_pb2.Empty())
    detailed = await stub.HealthCheck(empty_pb2.Empty(), metadata=AUTH)
    assert anonymous.status == detailed.status == "healthy"
    assert set(anonymous.components) == set(detailed.components)
    assert all(c.detail == "" for c in anonymous.components.values())
    assert any(c.detail for c in detailed.components.values())


async def test_grpc_health_follows_readiness_from_not_serving_to_serving_to_draining(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node(api_keys=(KEY,), start_models=False)
    health = health_pb2_grpc.HealthStub(await channel(served))
    checks, unknown = grpc_count("Health/Check", "ok"), grpc_count("Health/Check", "unknown_service")
    for service in ("", "ModelOps"):  # open: no key needed
        check = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert check.status == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="Nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert grpc_count("Health/Check", "ok") == checks + 2
    assert grpc_count("Health/Check", "unknown_service") == unknown + 1

    watch = health.Watch(health_pb2.HealthCheckRequest(service="ModelOps"))
    assert (await watch.read()).status == NOT_SERVING
    await served.node.start()
    assert (await asyncio.wait_for(watch.read(), 10)).status == SERVING
    check = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert check.status == SERVING

    drained = asyncio.create_task(served.node.drain(5.0))
    assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
    watch.cancel()
    await drained


async def test_stopping_the_server_tells_health_watchers_not_serving_and_ends_their_streams(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    health = health_pb2_grpc.HealthStub(await channel(served))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    while (await asyncio.wait_for(watch.read(), 10)).status != SERVING:
        pass  # the service follows readiness within its poll interval
    # Within the grace period (2 s here): an open Watch does not hold the stop.
    await asyncio.wait_for(served.grpc.stop(), 1.5)
    assert (await watch.read()).status == NOT_SERVING
    assert await watch.read() is grpc.aio.EOF


async def test_the_legacy_documents_load_example_loads_over_grpc_and_a_bad_kind_names_the_field(
    start_node: StartNode, channel: Any
) -> None:
    served = await start_node()
    stub = pb_grpc.ModelOpsStub(await channel(served))
    path = str(served.model_root / "b.gguf")
    example = pb.ModelLoadRequest(
        model_name="new-model", model_path=path, model_type="llm", quantization=True
    )
    loaded = await stub.LoadModel(example)
    assert loaded.success and loaded.message == "model new-model loaded"
    assert (await stub.Infer(infer_request(model_name="new-model"))).tokens_generated == 4
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.LoadModel(pb.ModelLoadRequest(model_name="c", model_path=path, model_type="xyz"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("model_type: ")
