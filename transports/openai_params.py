"""Validate OpenAI `/v1/completions` and `/v1/chat/completions` bodies: honoured or refused.

Pure: no I/O. Every key of a body is either honoured (it reaches the request's
`GenerationParams` or the answer's shape), accepted because it asks for nothing this node would
do otherwise (`user`, a `null`, `n: 1`, `echo: false`, `tool_choice: "none"`), or refused with
`InvalidRequest` naming it: a client asking for what we cannot do (log probabilities, tools)
learns so instead of getting plain text. A key OpenAI does not know is refused as OpenAI
refuses it ("Unrecognized request argument supplied"). Errors name OpenAI's fields (`prompt`,
`messages[0].content`), never the legacy payload's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from actors import names
from actors.errors import InvalidRequest
from actors.types import ChatMessage, EmbedRequest, GenerationParams, InferRequest
from transports.schema import (
    DEFAULTS,
    MAX_INPUT_CHARS,
    kind_of,
    model_name,
    optional_float,
    optional_int,
    require_object,
    sampling_params,
    stop_list,
)

__all__ = [
    "CHAT_ROLES",
    "JSON_OBJECT_SCHEMA",
    "MAX_EMBEDDING_INPUTS",
    "MAX_LOGIT_BIAS",
    "PENALTY_RANGE",
    "EmbeddingsRequest",
    "OpenAIRequest",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
]

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
PENALTY_RANGE = (-2.0, 2.0)
"""OpenAI's range for presence_penalty and frequency_penalty."""
REPEAT_PENALTY_RANGE = (0.0, 10.0)
"""llama.cpp's repeat_penalty (an extension): 1 is off; 0 would divide by zero."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 1024
"""Most tokens one request may bias (OpenAI sets no number; this bounds the worker's array)."""
JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""`response_format: {"type": "json_object"}`: any JSON object."""
MAX_TOP_LOGPROBS = 20
"""Chat's top_logprobs limit (OpenAI's); completions' logprobs stops at 5, as OpenAI's does."""
MAX_COMPLETION_LOGPROBS = 5
MAX_EMBEDDING_INPUTS = 2048
"""Most inputs one embeddings request may hold (OpenAI's own limit)."""
_EMBEDDINGS_KEYS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})

# Keys with the values that ask for nothing beyond what is served anyway (None always does).
# Any other value is refused as not supported, naming the key.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "functions": ([],),
    "function_call": ("none",),
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "reasoning_effort": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "verbosity": (),
}
# Strings a client may send that only identify it or its cache (ignored: nothing to honour).
_TAGS = ("user", "prompt_cache_key", "safety_identifier")
_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "repeat_penalty",  # llama.cpp's extension
        "logit_bias",
        "response_format",  # on completions: llama.cpp's extension
        "n",
        "logprobs",
        "user",
    }
)
_COMPLETION_KEYS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_KEYS = (
    _COMMON
    | {"messages", "max_completion_tokens", "top_logprobs"}
    | {k for k in _NEUTRAL if k not in ("best_of", "suffix")}
    | set(_TAGS)
)


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A validated OpenAI body: the node's request and how to shape the answer."""

    infer: InferRequest
    stream: bool = False
    include_usage: bool = False
    """Streamed: end with a chunk carrying `usage` (stream_options.include_usage)."""
    echo: bool = False
    """Completions: the answer's text starts with the prompt."""


def parse_completion(body: Any) -> OpenAIRequest:
    """Validate a `/v1/completions` body; InvalidRequest names the field at fault."""
    body = require_object(body, "body")
    _known_keys(body, _COMPLETION_KEYS)
    model = model_name(body, "model")
    prompt = _prompt(body.get("prompt"))
    echo = _bool(body, "echo")
    if echo and not isinstance(prompt, str):
        raise InvalidRequest("echo", "is supported with a text prompt only")
    stream = _bool(body, "stream")
    logprobs = optional_int(body, "logprobs", low=0, high=MAX_COMPLETION_LOGPROBS)
    if logprobs is not None and echo:
        raise InvalidRequest("logprobs", "with echo (the prompt's log probabilities) is not supported")
    params = _params(body, "max_tokens", _unstreamed(logprobs, stream))
    return OpenAIRequest(
        InferRequest(model=model, prompt=prompt, params=params),
        stream,
        _include_usage(body, stream),
        echo,
    )


def parse_chat(body: Any) -> OpenAIRequest:
    """Validate a `/v1/chat/completions` body; InvalidRequest names the field at fault."""
    body = require_object(body, "body")
    _known_keys(body, _CHAT_KEYS)
    model = model_name(body, "model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("messages", "expected a non-empty list of messages")
    messages = tuple(_chat_message(m, f"messages[{i}]") for i, m in enumerate(raw))
    # Newer clients send max_completion_tokens, the same limit under its new name.
    key = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        old = body.get("max_tokens")
        if old is not None and old != body["max_completion_tokens"]:
            raise InvalidRequest(
                "max_completion_tokens", "differs from max_tokens; send one of them"
            )
        key = "max_completion_tokens"
    stream = _bool(body, "stream")
    logprobs = _bool(body, "logprobs")
    top = optional_int(body, "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise InvalidRequest("top_logprobs", "needs logprobs: true")
    params = _params(body, key, _unstreamed((top or 0) if logprobs else None, stream))
    return OpenAIRequest(
        InferRequest(model=model, messages=messages, params=params),
        stream,
        _include_usage(body, stream),
    )


def _chat_message(value: Any, field: str) -> ChatMessage:
    msg = require_object(value, field)
    role = msg.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise InvalidRequest(f"{field}.role", f"must be one of {', '.join(sorted(CHAT_ROLES))}")
    content = msg.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        # Content parts: only text parts can be served by a text model.
        texts = []
        for j, part in enumerate(content):
            part_obj = require_object(part, f"{field}.content[{j}]")
            if part_obj.get("type") != "text" or not isinstance(part_obj.get("text"), str):
                raise InvalidRequest(f"{field}.content[{j}]", "only text parts are supported")
            texts.append(names.check_text(part_obj["text"], f"{field}.content[{j}].text"))
        content = "".join(texts)
    elif not isinstance(content, str):
        raise InvalidRequest(f"{field}.content", f"expected a string, got {kind_of(content)}")
    else:
        names.check_text(content, f"{field}.content")
    return ChatMessage(role=role, content=content)


def _known_keys(body: Mapping[str, Any], known: frozenset[str] | set[str]) -> None:
    for key in body:
        if key not in known:
            # An empty key is named as JSON writes it: a refusal always names its field.
            raise InvalidRequest(key[:64] or '""', "Unrecognized request argument supplied")
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        if key in body and value is not None and not _among(value, neutral):
            raise InvalidRequest(key, "is not supported by this server")
    for key in _TAGS:
        if key in body and body[key] is not None and not isinstance(body[key], str):
            raise InvalidRequest(key, f"expected a string, got {kind_of(body[key])}")


def _among(value: Any, choices: tuple[Any, ...]) -> bool:
    # `True == 1` in Python: a boolean is never the integer it equals, nor the reverse.
    return any(type(value) is type(c) and value == c for c in choices)


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A string, token ids, or a list holding exactly one of either."""
    if isinstance(value, list) and value and all(_is_token(t) for t in value):
        return _tokens(value, "prompt")
    if isinstance(value, list):
        # The OpenAI API also takes a list of prompts; one prompt per request is what we serve.
        if len(value) != 1:
            raise InvalidRequest("prompt", "exactly one prompt per request is supported")
        value = value[0]
        if isinstance(value, list):
            if not value or not all(_is_token(t) for t in value):
                raise InvalidRequest("prompt[0]", "expected a non-empty list of token ids")
            return _tokens(value, "prompt[0]")
    if not isinstance(value, str):
        raise InvalidRequest("prompt", f"expected a string or token ids, got {kind_of(value)}")
    names.check_text(value, "prompt")
    if len(value) > MAX_INPUT_CHARS:
        raise InvalidRequest("prompt", f"is {len(value)} characters; the limit is {MAX_INPUT_CHARS}")
    return value


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokens(value: list[int], field: str) -> tuple[int, ...]:
    if len(value) > MAX_INPUT_CHARS:
        raise InvalidRequest(field, f"is {len(value)} tokens; the limit is {MAX_INPUT_CHARS}")
    if any(t < 0 or t >= 1 << 31 for t in value):
        raise InvalidRequest(field, "token ids are integers from 0 up")
    return tuple(value)


def _unstreamed(logprobs: int | None, stream: bool) -> int | None:
    if logprobs is not None and stream:
        raise InvalidRequest("logprobs", "is not supported with stream; ask without streaming")
    return logprobs


def _params(
    body: Mapping[str, Any], max_tokens_key: str, logprobs: int | None
) -> GenerationParams:
    stop = body.get("stop")
    base = sampling_params(
        body,
        max_tokens_key=max_tokens_key,
        stop=stop_list([stop] if isinstance(stop, str) else stop, "stop"),
    )
    presence = optional_float(body, "presence_penalty", PENALTY_RANGE)
    frequency = optional_float(body, "frequency_penalty", PENALTY_RANGE)
    repeat = optional_float(body, "repeat_penalty", REPEAT_PENALTY_RANGE)
    if repeat is not None and repeat <= 0.0:
        raise InvalidRequest("repeat_penalty", "must be above 0 (1 is off)")
    return dataclasses.replace(
        base,
        presence_penalty=DEFAULTS.presence_penalty if presence is None else presence,
        frequency_penalty=DEFAULTS.frequency_penalty if frequency is None else frequency,
        repeat_penalty=DEFAULTS.repeat_penalty if repeat is None else repeat,
        logit_bias=_logit_bias(body.get("logit_bias")),
        json_schema=_response_format(body.get("response_format")),
        logprobs=logprobs,
    )


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (as strings) to a bias in -100..100."""
    if value is None:
        return ()
    value = require_object(value, "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequest("logit_bias", f"has {len(value)} tokens; the limit is {MAX_LOGIT_BIAS}")
    pairs: list[tuple[int, float]] = []
    for key, bias in value.items():
        # ASCII digits only: int() would also take "١٢", "+5", " 7" and "1_0".
        if not (key.isascii() and key.isdigit()) or len(key) > 9:
            raise InvalidRequest("logit_bias", f"keys are token ids; got {key[:32]!r}")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise InvalidRequest(f"logit_bias.{key}", f"expected a number, got {kind_of(bias)}")
        low, high = LOGIT_BIAS_RANGE
        if not low <= bias <= high or not math.isfinite(bias):
            raise InvalidRequest(f"logit_bias.{key}", f"must be between -100 and 100; got {bias}")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def _response_format(value: Any) -> str | None:
    """Return the JSON Schema (as JSON text) the output must satisfy, or None for free text."""
    if value is None:
        return None
    fmt = require_object(value, "response_format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise InvalidRequest(
            "response_format.type", "must be one of text, json_object, json_schema"
        )
    spec = require_object(fmt.get("json_schema"), "response_format.json_schema")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("response_format.json_schema.name", "expected a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):  # the grammar is always strict
        raise InvalidRequest("response_format.json_schema.strict", "expected a boolean")
    schema = spec.get("schema", {})
    if not isinstance(schema, Mapping):
        raise InvalidRequest(
            "response_format.json_schema.schema", f"expected an object, got {kind_of(schema)}"
        )
    return json.dumps(schema, ensure_ascii=False)


def _bool(body: Mapping[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(field, f"expected a boolean, got {kind_of(value)}")
    return value


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidRequest("stream_options", "is only allowed when stream is true")
    options = require_object(options, "stream_options")
    for key in options:
        if key != "include_usage":
            raise InvalidRequest(
                f"stream_options.{key[:64]}", "Unrecognized request argument supplied"
            )
    return _bool(options, "include_usage")


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    """A validated `/v1/embeddings` body."""

    embed: EmbedRequest
    base64: bool = False
    """encoding_format "base64": each vector as base64 of its little-endian float32 bytes."""
    dimensions: int | None = None
    """The length the client expects; any other than the model's is refused."""


def parse_embeddings(body: Any) -> EmbeddingsRequest:
    """Validate a `/v1/embeddings` body; InvalidRequest names the field at fault.

    `input` is a string, token ids, or a list of either (up to 2048 inputs); none may be empty.
    """
    body = require_object(body, "body")
    _known_keys(body, _EMBEDDINGS_KEYS)
    model = model_name(body, "model")
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise InvalidRequest("encoding_format", "must be float or base64")
    dimensions = optional_int(body, "dimensions", low=1, high=1 << 20)
    return EmbeddingsRequest(
        EmbedRequest(model=model, inputs=_embedding_inputs(body.get("input"))),
        encoding == "base64",
        dimensions,
    )


def _embedding_inputs(value: Any) -> tuple[str | tuple[int, ...], ...]:
    if value is None:
        raise InvalidRequest("input", "is required")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(_is_token(t) for t in value)
    ):
        return (_embedding_input(value, "input"),)
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input", "expected a string, token ids or a non-empty list of them")
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            "input", f"has {len(value)} inputs; the limit is {MAX_EMBEDDING_INPUTS}"
        )
    return tuple(_embedding_input(item, f"input[{i}]") for i, item in enumerate(value))


def _embedding_input(value: Any, field: str) -> str | tuple[int, ...]:
    if isinstance(value, str):
        if not value:
            raise InvalidRequest(field, "is empty")
        names.check_text(value, field)
        if len(value) > MAX_INPUT_CHARS:
            raise InvalidRequest(
                field, f"is {len(value)} characters; the limit is {MAX_INPUT_CHARS}"
            )
        return value
    if isinstance(value, list) and value and all(_is_token(t) for t in value):
        return _tokens(value, field)
    raise InvalidRequest(field, f"expected a non-empty string or token ids, got {kind_of(value)}")
