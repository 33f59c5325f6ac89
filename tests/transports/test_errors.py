"""The mapping from any exception to what a client is told (pure)."""

from __future__ import annotations

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
from transports.errors import BadFrame, PayloadTooLarge, Unauthorized, UnknownAction, classify

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


def test_a_refusal_is_logged_once_at_info_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="transports.errors"):
        classify(ModelFileInvalid("x.gguf is not a GGUF file"))
        classify(InvalidRequest("input_text", "contains a lone surrogate"))
    assert [(r.levelno, r.exc_info) for r in caplog.records] == [(logging.INFO, None)] * 2
    assert "input_text: contains a lone surrogate" in caplog.records[1].getMessage()
