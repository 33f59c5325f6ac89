"""The gRPC adapter's pure half: each error a client can meet gets its status code, and the
proto messages carry what the actions take and return."""

from __future__ import annotations

import grpc
import pytest

from actors.errors import (
    CircuitOpen,
    InsufficientMemory,
    InvalidRequest,
    ModelAlreadyLoaded,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    PathNotAllowed,
    RequestTimeout,
    ShuttingDown,
    WorkerCrashed,
)
from transports.errors import PayloadTooLarge, Unauthorized, classify
from transports.grpc_codec import (
    grpc_error,
    infer_payload,
    load_payload,
)
from transports.grpc_gen import modelops_pb2 as pb

S = grpc.StatusCode

CODES = {
    "a bad field": (InvalidRequest("max_tokens", "too many"), S.INVALID_ARGUMENT),
    "no key": (Unauthorized("missing API key"), S.UNAUTHENTICATED),
    "a path outside the model dirs": (PathNotAllowed("/etc/x"), S.PERMISSION_DENIED),
    "an unknown model": (ModelNotFound("nope"), S.NOT_FOUND),
    "an unload of a model not loaded": (ModelNotLoaded("b"), S.NOT_FOUND),
    "a model already loaded": (ModelAlreadyLoaded("a"), S.ALREADY_EXISTS),
    "a full bulkhead": (Overloaded("busy", retry_after=2.0), S.RESOURCE_EXHAUSTED),
    "an open breaker": (CircuitOpen("open"), S.UNAVAILABLE),
    "a draining node": (ShuttingDown("draining"), S.UNAVAILABLE),
    "a deadline": (RequestTimeout("late"), S.DEADLINE_EXCEEDED),
    "no memory": (InsufficientMemory("too big"), S.RESOURCE_EXHAUSTED),
    "a message too large": (PayloadTooLarge("big"), S.RESOURCE_EXHAUSTED),
    "a crashed worker": (WorkerCrashed("gone"), S.INTERNAL),
    "a bug": (KeyError("x"), S.INTERNAL),
}


@pytest.mark.parametrize(("error", "code"), CODES.values(), ids=CODES.keys())
def test_each_error_has_its_grpc_status_code(error: Exception, code: grpc.StatusCode) -> None:
    assert grpc_error(classify(error)).code == code


def test_a_refusal_names_its_field_and_code_in_the_trailers() -> None:
    refusal = grpc_error(classify(InvalidRequest("top_p", "must be between 0 and 1")))
    assert refusal.details == "top_p: must be between 0 and 1"
    assert dict(refusal.trailers) == {"moc-error-code": "invalid_request", "moc-error-field": "top_p"}


def test_overloaded_and_draining_carry_a_retry_after_trailer() -> None:
    busy = dict(grpc_error(classify(Overloaded("busy", retry_after=2.0))).trailers)
    draining = dict(grpc_error(classify(ShuttingDown("draining"))).trailers)
    assert busy["retry-after"] == "2"
    assert float(draining["retry-after"]) > 0


def test_an_infer_request_without_the_optional_fields_takes_the_legacy_defaults() -> None:
    payload = infer_payload(pb.InferenceRequest(model_name="a", input_text="hi"))
    assert payload == {"model_name": "a", "input_text": "hi", "stop_sequences": []}


def test_an_explicit_zero_temperature_is_sent_as_zero_not_as_the_default() -> None:
    payload = infer_payload(pb.InferenceRequest(model_name="a", input_text="hi", temperature=0.0))
    assert payload["temperature"] == 0.0


def test_a_load_request_sends_only_what_the_client_set() -> None:
    bare = load_payload(pb.ModelLoadRequest(model_name="m"))
    full = load_payload(
        pb.ModelLoadRequest(
            model_name="m", model_path="/m/x.gguf", model_type="llm", quantization=True,
            gpu_layers=0,
        )
    )
    assert bare == {"model_name": "m"}
    assert full == {
        "model_name": "m", "model_path": "/m/x.gguf", "model_type": "llm", "quantization": True,
        "gpu_layers": 0,
    }
