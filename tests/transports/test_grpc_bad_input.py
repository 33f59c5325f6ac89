"""Bad input over gRPC against a real Node: each refusal has its status code, names the field,
is counted in moc_grpc_requests_total, and the node goes on serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from actors.serving.config import BulkheadConfig
from tests.support import wait_for
from tests.transports.conftest import metric
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    MODEL,
    RealNode,
    StartNode,
    outside_model_fixture,
    start_node_fixture,
    tiny_models_fixture,
)
from transports.grpc_gen import modelops_pb2 as pb
from transports.grpc_gen import modelops_pb2_grpc as pb_grpc
from transports.grpc_server import HARD_LIMIT_FACTOR

LIMIT = 64 * 1024  # server.max_body_bytes in these tests: oversized messages stay small

BAD_INFER = {
    "empty model_name": ({"model_name": ""}, "model_name"),
    "too long input_text": ({"input_text": "x" * 10_001}, "input_text"),
    "negative max_tokens": ({"max_tokens": -1}, "max_tokens"),
    "zero max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "too many max_tokens": ({"max_tokens": 2049}, "max_tokens"),
    "temperature above 2": ({"temperature": 2.5}, "temperature"),
    "negative temperature": ({"temperature": -0.1}, "temperature"),
    "NaN temperature": ({"temperature": float("nan")}, "temperature"),
    "top_p above 1": ({"top_p": 1.5}, "top_p"),
    "eleven stop sequences": ({"stop_sequences": ["a"] * 11}, "stop_sequences"),
    "an empty stop sequence": ({"stop_sequences": [""]}, "stop_sequences[0]"),
}


@pytest.fixture(name="stub")
async def stub_fixture(start_node: StartNode) -> AsyncIterator[Any]:
    """A ModelOps client of a node with a small message limit and a one-slot bulkhead."""
    served = await start_node(
        bulkhead=BulkheadConfig(max_concurrent=1, max_queue_size=0), max_body_bytes=LIMIT
    )
    channel = grpc.aio.insecure_channel(served.grpc_target)
    stub = pb_grpc.ModelOpsStub(channel)
    stub.served = served
    yield stub
    await channel.close()


def infer_request(**overrides: Any) -> pb.InferenceRequest:
    fields: dict[str, Any] = {"model_name": MODEL, "input_text": "hello", "max_tokens": 2}
    fields.update(overrides)
    return pb.InferenceRequest(**fields)


async def refusal(call: Any, case: str = "") -> grpc.aio.AioRpcError:
    """Return the error that ends `call` (a unary call, or a stream refused before its first
    message); fail naming `case` when it succeeds."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await call.read()
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err
    pytest.fail(f"{case or 'the call'} was not refused")


def grpc_count(method: str, outcome: str) -> float:
    return metric("moc_grpc_requests_total", method=method, outcome=outcome)


async def test_every_bad_infer_field_is_invalid_argument_naming_the_field(stub: Any) -> None:
    counted = grpc_count("Infer", "invalid_request")
    streamed = grpc_count("InferStream", "invalid_request")
    for case, (fields, field) in BAD_INFER.items():
        for call in (stub.Infer, stub.InferStream):
            err = await refusal(call(infer_request(**fields)), case)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert err.details().startswith(f"{field}: "), (case, err.details())
            trailers = dict(err.trailing_metadata())
            assert trailers["moc-error-field"] == field, case
            assert trailers["moc-error-code"] == "invalid_request", case
    assert grpc_count("Infer", "invalid_request") == counted + len(BAD_INFER)
    assert grpc_count("InferStream", "invalid_request") == streamed + len(BAD_INFER)
    assert (await stub.Infer(infer_request())).tokens_generated == 2


async def test_an_unknown_model_is_not_found_for_infer_stream_and_unload(stub: Any) -> None:
    for call in (  # one at a time: a call starts when it is made
        lambda: stub.Infer(infer_request(model_name="nope")),
        lambda: stub.InferStream(infer_request(model_name="nope")),
        lambda: stub.UnloadModel(pb.ModelUnloadRequest(model_name="nope")),
    ):
        err = await refusal(call())
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.details()


async def test_a_path_outside_the_model_directories_is_permission_denied_without_naming_them(
    stub: Any, outside_model: Path
) -> None:
    counted = grpc_count("LoadModel", "path_not_allowed")
    err = await refusal(
        stub.LoadModel(pb.ModelLoadRequest(model_name="b", model_path=str(outside_model)))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "model path is outside the model directories"
    assert str(stub.served.model_root) not in err.details()
    assert grpc_count("LoadModel", "path_not_allowed") == counted + 1


async def test_loading_a_loaded_model_is_already_exists(stub: Any) -> None:
    err = await refusal(stub.LoadModel(pb.ModelLoadRequest(model_name=MODEL)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_an_oversized_message_is_resource_exhausted_and_counted(stub: Any) -> None:
    counted = grpc_count("Infer", "too_large")
    err = await refusal(stub.Infer(infer_request(input_text="x" * (LIMIT + 1))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_body_bytes" in err.details()
    assert grpc_count("Infer", "too_large") == counted + 1
    # Past grpc's own cap the message is refused before any method runs.
    err = await refusal(stub.Infer(infer_request(input_text="x" * (HARD_LIMIT_FACTOR * LIMIT))))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await stub.Infer(infer_request())).tokens_generated == 2


async def test_bytes_that_are_not_the_request_message_are_invalid_argument(stub: Any) -> None:
    channel = grpc.aio.insecure_channel(stub.served.grpc_target)
    raw = channel.unary_unary("/ModelOps/Infer")
    try:
        err = await refusal(raw(b"\xff\xff\xff\xff"))
    finally:
        await channel.close()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "request: is not a valid InferenceRequest"


async def test_past_the_bulkhead_infer_is_resource_exhausted_with_a_retry_after_trailer(
    stub: Any,
) -> None:
    served: RealNode = stub.served
    stream = stub.InferStream(infer_request(max_tokens=2000))
    assert (await stream.read()).WhichOneof("item") == "text"
    err = await refusal(stub.Infer(infer_request()))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(err.trailing_metadata())
    assert trailers["moc-error-code"] == "overloaded"
    assert float(trailers["retry-after"]) > 0
    stream.cancel()
    await wait_for(lambda: served.in_flight() == 0, timeout=10.0)
    assert (await stub.Infer(infer_request())).tokens_generated == 2


async def test_an_unknown_method_is_unimplemented_and_the_node_keeps_serving(stub: Any) -> None:
    channel = grpc.aio.insecure_channel(stub.served.grpc_target)
    try:
        err = await refusal(channel.unary_unary("/ModelOps/Nope")(b""))
    finally:
        await channel.close()
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (await stub.ListModels(empty_pb2.Empty())).models
