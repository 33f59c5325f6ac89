"""The action table, against the fake node (no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from actors.errors import (
    InvalidRequest,
    ModelAlreadyLoaded,
    RequestTimeout,
)
from actors.types import InferResult, TokenChunk
from transports import schema
from transports.dispatch import Dispatcher, lookup_action
from transports.errors import UnknownAction

from .conftest import FakeNode, server_config


def test_unknown_actions_and_disabled_features_are_told_apart() -> None:
    with pytest.raises(UnknownAction):
        lookup_action("make_coffee")
    with pytest.raises(InvalidRequest):
        lookup_action(None)
    assert lookup_action("list_jobs").name == "list_jobs"


async def test_infer_returns_the_legacy_result_fields(node: FakeNode) -> None:
    d = Dispatcher(node, server_config())
    result = await d.call("infer", {"model_name": "tiny", "input_text": "hi", "max_tokens": 3})
    assert result["output_text"] == "Hello, world"
    assert result["tokens_generated"] == 3
    assert result["model_version"] == "tiny-v1"
    assert isinstance(result["latency_ms"], float)
    assert node.requests[-1].timeout_s == d.config.request_timeout_s


async def test_an_inference_past_its_deadline_is_cancelled_and_answered_as_a_timeout(
    node: FakeNode,
) -> None:
    node.gate = asyncio.Event()  # never set: the "model" hangs
    d = Dispatcher(node, server_config(request_timeout_s=0.05))
    with pytest.raises(RequestTimeout):
        await d.call("infer", {"model_name": "tiny", "input_text": "hi"})
    assert node.inference_cancelled.is_set()


async def test_load_reports_memory_usage_and_a_second_load_is_refused(node: FakeNode) -> None:
    d = Dispatcher(node, server_config())
    loaded = await d.call("load_model", {"model_name": "small"})
    assert loaded["status"] == "loaded"
    assert loaded["memory_usage_mb"] == 64.0
    with pytest.raises(ModelAlreadyLoaded):
        await d.call("load_model", {"model_name": "small"})


async def test_unload_then_list_shows_the_model_available(node: FakeNode) -> None:
    d = Dispatcher(node, server_config())
    assert (await d.call("unload_model", {"model_name": "tiny"}))["status"] == "unloaded"
    listing = await d.call("list_models", {})
    states = {m["name"]: m["state"] for m in listing["models"]}
    assert states["tiny"] == "available"


async def test_devices_say_when_they_are_simulated(node: FakeNode) -> None:
    devices = (await Dispatcher(node, server_config()).call("list_devices", {}))["devices"]
    assert [(d["label"], d["simulated"]) for d in devices] == [
        ("cpu", False),
        ("sim0 (simulated)", True),
    ]


async def test_the_legacy_infer_action_names_the_legacy_field_of_an_error(node: FakeNode) -> None:
    # The node names request fields as InferRequest does; the legacy payload has its own names.
    d = Dispatcher(node, server_config())
    node.fail = InvalidRequest("prompt", "prompt is 3000 tokens; the context holds 2048")
    with pytest.raises(InvalidRequest) as refused:
        await d.call("infer", {"model_name": "tiny", "input_text": "hi"})
    assert refused.value.field == "input_text"
    assert str(refused.value) == "input_text: prompt is 3000 tokens; the context holds 2048"


@pytest.mark.parametrize("action", ["get_job", "cancel_job", "get_goal", "cancel_goal"])
async def test_an_id_with_a_lone_surrogate_is_refused_before_the_node_is_asked(
    node: FakeNode, action: str
) -> None:
    field = "job_id" if "job" in action else "goal_id"
    with pytest.raises(InvalidRequest) as refused:
        await Dispatcher(node, server_config()).call(action, {field: "ab\ud800"})
    assert refused.value.field == field


async def test_a_client_deadline_caps_the_timeouts_and_a_later_one_changes_nothing(
    node: FakeNode,
) -> None:
    d = Dispatcher(node, server_config(request_timeout_s=120.0, load_timeout_s=600.0))
    bounded = d.within(0.5)
    assert (bounded.request_timeout_s, bounded.load_timeout_s) == (0.5, 0.5)
    assert d.within(None) is d and d.within(900.0) is d
    await bounded.call("infer", {"model_name": "tiny", "input_text": "hi"})
    assert node.requests[-1].timeout_s == 0.5


async def test_a_stream_yields_pieces_then_the_result_and_closing_it_closes_the_nodes(
    node: FakeNode,
) -> None:
    d = Dispatcher(node, server_config())
    req = schema.parse_infer({"model_name": "tiny", "input_text": "hi", "max_tokens": 3})
    items = [item async for item in d.stream(req)]
    assert [type(i) for i in items] == [TokenChunk] * 3 + [InferResult]
    early = d.stream(req)
    assert isinstance(await anext(early), TokenChunk)
    node.stream_closed.clear()
    await early.aclose()
    assert node.stream_closed.is_set()


async def test_a_stream_past_its_deadline_ends_as_a_timeout(node: FakeNode) -> None:
    node.gate = asyncio.Event()  # never set: the first piece never comes
    d = Dispatcher(node, server_config(request_timeout_s=0.05))
    req = schema.parse_infer({"model_name": "tiny", "input_text": "hi"})
    with pytest.raises(RequestTimeout):
        [item async for item in d.stream(req)]
    assert node.stream_closed.is_set()
