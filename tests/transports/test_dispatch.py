"""The action table and the error mapping, against the fake node (no sockets)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from actors.errors import (
    Cancelled,
    CircuitOpen,
    FeatureUnavailable,
    InsufficientMemory,
    InvalidRequest,
    MocError,
    ModelAlreadyLoaded,
    ModelFileInvalid,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotLoaded,
    NameTaken,
    Overloaded,
    PathNotAllowed,
    RequestTimeout,
    ShuttingDown,
    StateNotWritable,
    WorkerCrashed,
)
from transports.dispatch import (
    BadFrame,
    Dispatcher,
    PayloadTooLarge,
    Unauthorized,
    UnknownAction,
    classify,
    lookup_action,
)

from .conftest import FakeNode, server_config

STATUS_TABLE = [
    ("invalid", InvalidRequest("max_tokens", "too big"), 400, "invalid_request"),
    ("bad frame", BadFrame("garbage"), 400, "bad_frame"),
    ("unknown action", UnknownAction("nope"), 400, "unknown_action"),
    ("unauthorized", Unauthorized("no key"), 401, "unauthorized"),
    ("path not allowed", PathNotAllowed("/etc"), 403, "path_not_allowed"),
    ("unknown model", ModelNotFound("x"), 404, "model_not_found"),
    ("not loaded", ModelNotLoaded("x"), 404, "model_not_loaded"),
    ("already loaded", ModelAlreadyLoaded("x"), 409, "model_already_loaded"),
    ("output name taken", NameTaken("output_name", "model 'a' exists"), 409, "name_taken"),
    ("not a model file", ModelFileInvalid("x.gguf is not a GGUF file"), 400, "model_file_invalid"),
    ("state not written", StateNotWritable("disk full"), 500, "state_not_writable"),
    ("too large", PayloadTooLarge("big"), 413, "too_large"),
    ("cancelled", Cancelled("gone"), 499, "cancelled"),
    ("worker crash", WorkerCrashed("boom"), 500, "worker_crashed"),
    ("load failed", ModelLoadFailed("bad file"), 500, "model_load_failed"),
    ("feature off", FeatureUnavailable("learning is off"), 501, "not_available"),
    ("overloaded", Overloaded("busy", retry_after=3.0), 503, "overloaded"),
    ("circuit open", CircuitOpen("failing", retry_after=20.0), 503, "circuit_open"),
    ("shutting down", ShuttingDown("draining"), 503, "shutting_down"),
    ("timeout", RequestTimeout("slow"), 504, "timeout"),
    ("no memory", InsufficientMemory("8 GB short"), 507, "insufficient_memory"),
    ("other domain error", MocError("odd"), 500, "internal_error"),
    ("a bug", KeyError("secret internals"), 500, "internal_error"),
]


@pytest.mark.parametrize(
    ("exc", "status", "code"), [c[1:] for c in STATUS_TABLE], ids=[c[0] for c in STATUS_TABLE]
)
def test_each_error_class_maps_to_its_status_and_code(
    exc: BaseException, status: int, code: str
) -> None:
    reply = classify(exc)
    assert (reply.status, reply.code) == (status, code)


def test_overload_errors_carry_their_retry_hint() -> None:
    assert classify(Overloaded("busy", retry_after=3.0)).retry_after == 3.0
    assert classify(CircuitOpen("failing", retry_after=20.0)).retry_after == 20.0
    assert classify(ShuttingDown("draining")).retry_after is not None
    assert classify(ModelNotFound("x")).retry_after is None


def test_an_unexpected_exception_shows_the_client_nothing_internal() -> None:
    assert "secret" not in classify(KeyError("secret internals")).message


def test_an_invalid_request_names_its_field() -> None:
    assert classify(InvalidRequest("top_p", "must be between 0 and 1")).field == "top_p"


def test_unknown_actions_and_disabled_features_are_told_apart() -> None:
    with pytest.raises(UnknownAction):
        lookup_action("make_coffee")
    with pytest.raises(InvalidRequest):
        lookup_action(None)
    assert lookup_action("list_jobs").name == "list_jobs"
    disabled = classify(FeatureUnavailable("learning is not enabled"))
    assert (disabled.status, disabled.code) == (501, "not_available")


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


def test_a_refusal_is_logged_once_at_info_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="transports.dispatch"):
        classify(ModelFileInvalid("x.gguf is not a GGUF file"))
        classify(InvalidRequest("input_text", "contains a lone surrogate"))
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.INFO, None)] * 2
    assert "input_text: contains a lone surrogate" in caplog.records[1].getMessage()


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
