"""Property tests of `transports.schema` (legacy payloads) and `transports.openai_params` (OpenAI
bodies): any payload parses within the limits or is refused.

The payloads are what JSON and msgpack decoding can produce (strings, numbers of any size, NaN and
infinities, booleans, null, bytes, lists, objects with string or bytes keys), both free-form and
shaped around the fields the parsers read, so the deep branches get exercised too. The one
outcome that must never happen is an exception other than `InvalidRequest`: on a live node that
would be a 500 instead of a 400 naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from actors.errors import InvalidRequest
from actors.types import GenerationParams, InferRequest
from transports import openai_params, schema

SETTINGS = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # JSON has no integer limit: 10**400 parses
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),  # NaN and infinities included: Python's json accepts them
    st.text(max_size=20),
    st.binary(max_size=8),  # msgpack bin
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), inner, max_size=4),
    ),
    max_leaves=12,
)
names = st.one_of(
    st.sampled_from(["tiny", "a", " ", "", "x" * 257, "x" * 256]), st.text(max_size=12)
)
texts = st.one_of(
    st.text(max_size=30), st.just("x" * schema.MAX_INPUT_CHARS), st.just("y" * 10_001)
)
ints_near_limits = st.one_of(
    st.integers(min_value=-3, max_value=2100),
    st.sampled_from([0, 1, 2048, 2049, -1, 2**63, -(2**63), 2**64, 10**400]),
)
numbers = st.one_of(
    st.floats(),
    st.floats(min_value=-0.5, max_value=2.5),
    ints_near_limits,
    st.sampled_from([10**400, -(10**400), 2**1024]),  # too large for a float
)
stops = st.one_of(
    st.lists(st.text(max_size=5), max_size=12),
    st.lists(json_like, max_size=3),
    json_like,
)


def field_value(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: usually from `strategy`, sometimes anything at all."""
    return st.one_of(strategy, strategy, json_like)


def shaped(
    valid: Mapping[str, Any], fields: Mapping[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects that start valid, then get fields replaced, added or removed, plus stray keys.

    Starting valid matters: the parsers check fields in order, so a payload that is wrong
    everywhere only ever exercises the first check.
    """
    edits = st.fixed_dictionaries({}, optional={k: field_value(v) for k, v in fields.items()})
    removals = st.sets(st.sampled_from(sorted(valid)), max_size=1)
    extra = st.dictionaries(st.text(max_size=6), json_like, max_size=2)

    def build(parts: tuple[dict[str, Any], set[str], dict[str, Any]]) -> dict[str, Any]:
        changed, removed, stray = parts
        body = {**stray, **valid, **changed}
        for key in removed:
            body.pop(key, None)
        return body

    return st.tuples(edits, removals, extra).map(build)


SAMPLING = {
    "max_tokens": ints_near_limits,
    "temperature": numbers,
    "top_p": numbers,
    "seed": ints_near_limits,
}
infer_payloads = shaped(
    {"model_name": "tiny", "input_text": "hello"},
    {"model_name": names, "input_text": texts, "stop_sequences": stops, **SAMPLING},
)
load_payloads = shaped(
    {"model_name": "tiny"},
    {
        "model_name": names,
        "model_path": st.text(max_size=20),
        "model_type": st.sampled_from(["gguf", "torch", "onnx"]),
        "gpu_layers": ints_near_limits,
        "n_ctx": ints_near_limits,
        "pin": st.booleans(),
        "quantization": st.text(max_size=5),
    },
)
chat_parts = st.lists(
    st.fixed_dictionaries(
        {}, optional={"type": st.sampled_from(["text", "image_url"]), "text": json_like}
    ),
    max_size=3,
)
chat_messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from([*openai_params.CHAT_ROLES, "robot"]),
            "content": st.one_of(st.text(max_size=10), chat_parts, json_like),
        },
    ),
    max_size=4,
)
token_ids = st.lists(st.integers(min_value=-2, max_value=2**31), max_size=4)
OPENAI = {
    "model": names,
    "n": st.one_of(st.sampled_from([1, 1.0, 2, True]), json_like),
    "stream": json_like,
    "stream_options": st.one_of(st.just({"include_usage": True}), json_like),
    "stop": stops,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repeat_penalty": numbers,
    "logit_bias": st.one_of(
        st.dictionaries(st.sampled_from(["0", "7", "-1", "x", "1" * 10]), numbers, max_size=3),
        json_like,
    ),
    "response_format": st.one_of(
        st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "yaml"}]),
        st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": json_like}),
        json_like,
    ),
    "logprobs": st.one_of(ints_near_limits, st.booleans()),
    **SAMPLING,
}
completion_bodies = shaped(
    {"model": "tiny", "prompt": "hello"},
    {
        "prompt": st.one_of(texts, st.lists(texts, max_size=2), token_ids, st.lists(token_ids)),
        "echo": json_like,
        **OPENAI,
    },
)
chat_bodies = shaped(
    {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    {
        "messages": chat_messages,
        "max_completion_tokens": ints_near_limits,
        "top_logprobs": ints_near_limits,
        **OPENAI,
    },
)
embeddings_bodies = shaped(
    {"model": "tiny", "input": "hello"},
    {
        "model": names,
        "input": st.one_of(texts, token_ids, st.lists(st.one_of(texts, token_ids), max_size=3)),
        "encoding_format": st.sampled_from(["float", "base64", "hex"]),
        "dimensions": ints_near_limits,
    },
)


def outcome(parse: Callable[[Any], Any], payload: Any) -> Any:
    """Return what `parse` returns, or the InvalidRequest it raises (checked to name a field)."""
    try:
        return parse(payload)
    except InvalidRequest as exc:
        assert exc.field, "a refusal must name the field"
        assert str(exc).startswith(f"{exc.field}: ")
        return exc


def assert_params_within_limits(params: GenerationParams) -> None:
    low, high = schema.MAX_TOKENS_RANGE
    assert type(params.max_tokens) is int and low <= params.max_tokens <= high
    for value, (lo, hi) in (
        (params.temperature, schema.TEMPERATURE_RANGE),
        (params.top_p, schema.TOP_P_RANGE),
    ):
        assert type(value) is float and math.isfinite(value) and lo <= value <= hi
    assert len(params.stop) <= schema.MAX_STOP_SEQUENCES
    assert all(type(s) is str and s for s in params.stop)
    assert params.seed is None or type(params.seed) is int


def assert_model_name(name: Any) -> None:
    assert type(name) is str and name.strip() and len(name) <= schema.MAX_NAME_CHARS


@SETTINGS
@given(st.one_of(infer_payloads, json_like))
# Found by this test: a number too large for a float made math.isfinite raise OverflowError.
@example({"model_name": "tiny", "input_text": "hello", "temperature": 10**400})
def test_an_infer_payload_parses_within_the_limits_or_is_refused_naming_a_field(
    payload: Any,
) -> None:
    result = outcome(schema.parse_infer, payload)
    if isinstance(result, InferRequest):
        assert_model_name(result.model)
        assert type(result.prompt) is str and len(result.prompt) <= schema.MAX_INPUT_CHARS
        assert_params_within_limits(result.params)


@SETTINGS
@given(st.one_of(load_payloads, json_like))
def test_a_load_payload_parses_within_the_limits_or_is_refused_naming_a_field(
    payload: Any,
) -> None:
    result = outcome(schema.parse_load, payload)
    if not isinstance(result, InvalidRequest):
        assert_model_name(result.name)
        assert result.backend in (None, *schema.BACKENDS)
        assert result.pin in (None, True, False)
        assert result.n_ctx is None or result.n_ctx >= 1
        assert result.gpu_layers is None or result.gpu_layers >= -1


@SETTINGS
@given(st.one_of(load_payloads, json_like))
def test_an_unload_payload_names_a_model_or_is_refused_naming_a_field(payload: Any) -> None:
    result = outcome(schema.parse_model_name, payload)
    if not isinstance(result, InvalidRequest):
        assert_model_name(result)


def assert_openai_params_within_limits(params: GenerationParams) -> None:
    assert_params_within_limits(params)
    low, high = openai_params.PENALTY_RANGE
    for value in (params.presence_penalty, params.frequency_penalty):
        assert type(value) is float and low <= value <= high
    assert type(params.repeat_penalty) is float and params.repeat_penalty > 0
    assert len(params.logit_bias) <= openai_params.MAX_LOGIT_BIAS
    for token, bias in params.logit_bias:
        assert type(token) is int and token >= 0 and -100 <= bias <= 100
    assert params.json_schema is None or type(params.json_schema) is str
    assert params.logprobs is None or 0 <= params.logprobs <= 20


def assert_prompt(prompt: Any) -> None:
    if isinstance(prompt, tuple):  # token ids
        assert prompt and all(type(t) is int and 0 <= t < 2**31 for t in prompt)
    else:
        assert type(prompt) is str and len(prompt) <= schema.MAX_INPUT_CHARS


@SETTINGS
@given(st.one_of(completion_bodies, json_like))
# Found by this test: an empty key was refused naming the field "".
@example({"model": "tiny", "prompt": "hello", "": None})
def test_a_completion_body_parses_within_the_limits_or_is_refused_naming_a_field(
    body: Any,
) -> None:
    result = outcome(openai_params.parse_completion, body)
    if not isinstance(result, InvalidRequest):
        assert_model_name(result.infer.model)
        assert_prompt(result.infer.prompt)
        assert result.stream in (True, False)
        assert not result.include_usage or result.stream
        assert_openai_params_within_limits(result.infer.params)


@SETTINGS
@given(st.one_of(chat_bodies, json_like))
def test_a_chat_body_parses_within_the_limits_or_is_refused_naming_a_field(body: Any) -> None:
    result = outcome(openai_params.parse_chat, body)
    if not isinstance(result, InvalidRequest):
        req = result.infer
        assert_model_name(req.model)
        assert req.messages
        for message in req.messages:
            assert message.role in openai_params.CHAT_ROLES and type(message.content) is str
        assert result.stream in (True, False)
        assert_openai_params_within_limits(req.params)


@SETTINGS
@given(st.one_of(embeddings_bodies, json_like))
def test_an_embeddings_body_parses_within_the_limits_or_is_refused_naming_a_field(
    body: Any,
) -> None:
    result = outcome(openai_params.parse_embeddings, body)
    if not isinstance(result, InvalidRequest):
        assert_model_name(result.embed.model)
        assert 1 <= len(result.embed.inputs) <= openai_params.MAX_EMBEDDING_INPUTS
        for item in result.embed.inputs:
            assert item  # never empty
            assert_prompt(item)
        assert result.base64 in (True, False)
