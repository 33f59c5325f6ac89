"""Validate legacy request payloads into `actors.types` values; the field checks fronts share.

Pure: no I/O. Every refusal is an `InvalidRequest(field, message)` naming the field, so a client
learns what to fix. Limits are those of the legacy contract (DESIGN §4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from actors import names
from actors.errors import InvalidRequest
from actors.types import Backend, GenerationParams, InferRequest, LoadRequest
from transports.tensors import parse_tensors

__all__ = [
    "BACKENDS",
    "DEFAULTS",
    "MAX_INPUT_CHARS",
    "MAX_NAME_CHARS",
    "MAX_STOP_SEQUENCES",
    "MAX_TOKENS_RANGE",
    "MODEL_KINDS",
    "PAGE_LIMIT_DEFAULT",
    "PAGE_LIMIT_MAX",
    "PAGE_OFFSET_MAX",
    "TEMPERATURE_RANGE",
    "TOP_P_RANGE",
    "Page",
    "kind_of",
    "model_name",
    "optional_float",
    "optional_int",
    "parse_infer",
    "parse_load",
    "parse_model_name",
    "parse_page",
    "require_object",
    "sampling_params",
    "stop_list",
]

MAX_INPUT_CHARS = 10_000
MAX_TOKENS_RANGE = (1, 2048)
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)
MAX_STOP_SEQUENCES = 10
MAX_NAME_CHARS = names.MODEL_NAME_MAX_BYTES  # bytes of UTF-8; ASCII names: characters
DEFAULTS = GenerationParams()
BACKENDS: tuple[Backend, ...] = ("gguf", "torch")
MODEL_KINDS: tuple[str, ...] = ("llm",)
"""Legacy `model_type` values, which name the kind of model rather than a backend: the backend
then follows from the file. "llm" is the one the legacy document uses and the one served
(text generation); a kind the node cannot serve (vision, audio) is refused, not guessed."""
PAGE_LIMIT_DEFAULT = 100
"""Items in one page of a list (jobs, goals, models) when the request names no `limit`."""
PAGE_LIMIT_MAX = 1000
"""Most items one page may hold: a reply stays a few MiB at most, whatever is stored."""
PAGE_OFFSET_MAX = 10_000_000


@dataclass(frozen=True, slots=True)
class Page:
    """Which slice of a list a request asks for: `limit` items from position `offset`."""

    limit: int = PAGE_LIMIT_DEFAULT
    offset: int = 0


def parse_page(payload: Mapping[str, Any]) -> Page:
    """Validate `limit` (1..1000, default 100) and `offset` (>= 0, default 0) of a list request.

    Integers, or strings of digits (HTTP query parameters arrive as strings).
    """
    payload = require_object(payload, "payload")
    limit = _page_int(payload, "limit", 1, PAGE_LIMIT_MAX)
    offset = _page_int(payload, "offset", 0, PAGE_OFFSET_MAX)
    return Page(
        limit=PAGE_LIMIT_DEFAULT if limit is None else limit,
        offset=0 if offset is None else offset,
    )


def _page_int(payload: Mapping[str, Any], field: str, low: int, high: int) -> int | None:
    value = payload.get(field)
    if isinstance(value, str):
        # ASCII digits only: int() would also take "١٢", "+5", " 7" and "1_0".
        if not (value.isascii() and value.isdigit()) or len(value) > 9:
            raise InvalidRequest(field, f"expected an integer in {low}..{high}, got a string")
        value = int(value)
    return optional_int({field: value}, field, low=low, high=high)


def require_object(value: Any, field: str) -> Mapping[str, Any]:
    """Return `value` if it is a mapping with string keys, else refuse naming `field`."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(field, f"expected an object, got {kind_of(value)}")
    if not all(isinstance(k, str) for k in value):
        raise InvalidRequest(field, "object keys must be strings")
    return value


def parse_infer(payload: Mapping[str, Any]) -> InferRequest:
    """Validate a legacy infer payload (`model_name`, `input_text`, sampling fields).

    A torch model takes `input_tensors` instead of `input_text` (see transports.tensors).
    """
    payload = require_object(payload, "payload")
    model = model_name(payload, "model_name")
    if payload.get("input_tensors") is not None:
        if payload.get("input_text") is not None:
            raise InvalidRequest("input_tensors", "send input_text or input_tensors, not both")
        return InferRequest(
            model=model, tensors=parse_tensors(payload["input_tensors"], "input_tensors")
        )
    text = _required_text(payload, "input_text")
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidRequest(
            "input_text", f"is {len(text)} characters; the limit is {MAX_INPUT_CHARS}"
        )
    params = sampling_params(
        payload,
        max_tokens_key="max_tokens",
        stop=stop_list(payload.get("stop_sequences"), "stop_sequences"),
    )
    return InferRequest(model=model, prompt=text, params=params)


def parse_load(payload: Mapping[str, Any]) -> LoadRequest:
    """Validate a legacy load payload (`model_name`, optional path, type, quantization, layers).

    `model_type` is a backend (gguf, torch) or a legacy kind of model (llm: the backend follows
    from the file, see `actors.serving.entry.backend_for`). `quantization` is the legacy boolean
    (or, as before, the name of a GGUF quantization): accepted and without effect, since a GGUF
    file carries its own quantization and a torch program runs as exported.
    """
    payload = require_object(payload, "payload")
    name = model_name(payload, "model_name")
    path = _optional_str(payload, "model_path")
    if path is not None:
        names.check_path(path, "model_path")
    backend = _backend(_optional_str(payload, "model_type"))
    quantization = payload.get("quantization")
    if quantization is not None and not isinstance(quantization, bool | str):
        raise InvalidRequest("quantization", f"expected a boolean, got {kind_of(quantization)}")
    if isinstance(quantization, str):
        names.check_text(quantization, "quantization")
    gpu_layers = optional_int(payload, "gpu_layers", low=-1, high=100_000)
    n_ctx = optional_int(payload, "n_ctx", low=1, high=1 << 20)
    pin = payload.get("pin")
    if pin is not None and not isinstance(pin, bool):
        raise InvalidRequest("pin", f"expected a boolean, got {kind_of(pin)}")
    return LoadRequest(
        name=name,
        path=path,
        backend=backend,
        n_ctx=n_ctx,
        gpu_layers=gpu_layers,
        pin=pin,
        # The legacy boolean names nothing to keep: only a quantization's name is passed on.
        quantization=quantization if isinstance(quantization, str) else None,
    )


def _backend(model_type: str | None) -> Backend | None:
    """Return the backend `model_type` names; None for a legacy kind (or none given)."""
    if model_type is None or model_type in MODEL_KINDS:
        return None
    for backend in BACKENDS:
        if model_type == backend:
            return backend
    accepted = ", ".join((*MODEL_KINDS, *BACKENDS))
    shown = model_type if len(model_type) <= 40 else model_type[:40] + "..."
    raise InvalidRequest(
        "model_type",
        f"must be one of {accepted} (llm: the backend follows from the file); got {shown!r}",
    )


def parse_model_name(payload: Mapping[str, Any]) -> str:
    """Validate a payload that only names a model (`model_name`), as unload does."""
    return model_name(require_object(payload, "payload"), "model_name")


def sampling_params(
    body: Mapping[str, Any], *, max_tokens_key: str, stop: tuple[str, ...]
) -> GenerationParams:
    """Validate the sampling fields every front shares (the token limit under `max_tokens_key`,
    `temperature`, `top_p`, `seed`); the rest of the parameters keep their defaults."""
    max_tokens = optional_int(
        body, max_tokens_key, low=MAX_TOKENS_RANGE[0], high=MAX_TOKENS_RANGE[1]
    )
    temperature = optional_float(body, "temperature", TEMPERATURE_RANGE)
    top_p = optional_float(body, "top_p", TOP_P_RANGE)
    seed = optional_int(body, "seed", low=-(1 << 63), high=(1 << 64) - 1)
    return GenerationParams(
        max_tokens=DEFAULTS.max_tokens if max_tokens is None else max_tokens,
        temperature=DEFAULTS.temperature if temperature is None else temperature,
        top_p=DEFAULTS.top_p if top_p is None else top_p,
        stop=stop,
        seed=seed,
    )


def stop_list(value: Any, field: str) -> tuple[str, ...]:
    """Validate stop sequences: at most 10 non-empty strings (None: none)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidRequest(field, f"expected a list of strings, got {kind_of(value)}")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(field, f"has {len(value)} entries; the limit is {MAX_STOP_SEQUENCES}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise InvalidRequest(f"{field}[{i}]", "expected a non-empty string")
        names.check_text(item, f"{field}[{i}]")
        if len(item) > MAX_INPUT_CHARS:
            raise InvalidRequest(f"{field}[{i}]", "is too long")
    return tuple(value)


def model_name(body: Mapping[str, Any], field: str) -> str:
    """Return the model name `body[field]` (required), checked as every model name is."""
    return names.check_name(_required_str(body, field), field)


def _required_text(body: Mapping[str, Any], field: str) -> str:
    return names.check_text(_required_str(body, field), field)


def _required_str(body: Mapping[str, Any], field: str) -> str:
    if field not in body or body[field] is None:
        raise InvalidRequest(field, "is required")
    value = body[field]
    if not isinstance(value, str):
        raise InvalidRequest(field, f"expected a string, got {kind_of(value)}")
    return value


def _optional_str(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(field, f"expected a string, got {kind_of(value)}")
    return value


def optional_int(body: Mapping[str, Any], field: str, *, low: int, high: int) -> int | None:
    """Return the integer `body[field]` in low..high, or None when absent or null."""
    value = body.get(field)
    if value is None:
        return None
    # bool is an int subclass; `true` is not a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(field, f"expected an integer, got {kind_of(value)}")
    if not low <= value <= high:
        raise InvalidRequest(field, f"must be between {low} and {high}; got {value}")
    return value


def optional_float(
    body: Mapping[str, Any], field: str, bounds: tuple[float, float]
) -> float | None:
    """Return the finite number `body[field]` within `bounds`, or None when absent or null."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(field, f"expected a number, got {kind_of(value)}")
    low, high = bounds
    # Range first: an integer too large for a float (JSON allows 10**400) makes isfinite raise
    # OverflowError; NaN fails every comparison, so the range check refuses it too.
    if not low <= value <= high or not math.isfinite(value):
        raise InvalidRequest(field, f"must be between {low:g} and {high:g}; got {value}")
    return float(value)


def kind_of(value: Any) -> str:
    """Name a JSON-ish type for error messages without echoing the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
