"""Validation of legacy infer and load payloads (pure, table-driven).

OpenAI bodies are tests/transports/test_openai_params.py's.
"""

from __future__ import annotations

from typing import Any

import pytest

from actors.errors import InvalidRequest
from actors.types import GenerationParams
from transports import schema

GOOD = {"model_name": "tiny", "input_text": "hello"}
LONE = "\ud800"  # a lone surrogate, as json.loads makes of the escape \ud800


def test_an_infer_payload_with_only_required_fields_gets_the_legacy_defaults() -> None:
    req = schema.parse_infer(GOOD)
    assert req.model == "tiny"
    assert req.prompt == "hello"
    assert req.params == GenerationParams(max_tokens=50, temperature=0.7, top_p=0.9, stop=())


def test_an_infer_payload_with_every_field_keeps_them() -> None:
    req = schema.parse_infer(
        {**GOOD, "max_tokens": 2048, "temperature": 0, "top_p": 1, "stop_sequences": ["\n", "END"]}
    )
    assert req.params == GenerationParams(
        max_tokens=2048, temperature=0.0, top_p=1.0, stop=("\n", "END")
    )


BAD_INFER: list[tuple[str, dict[str, Any], str]] = [
    ("missing model", {"input_text": "x"}, "model_name"),
    ("empty model", {**GOOD, "model_name": " "}, "model_name"),
    ("model not a string", {**GOOD, "model_name": 7}, "model_name"),
    ("missing text", {"model_name": "tiny"}, "input_text"),
    ("text not a string", {**GOOD, "input_text": ["a"]}, "input_text"),
    ("text too long", {**GOOD, "input_text": "x" * 10_001}, "input_text"),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("max_tokens too large", {**GOOD, "max_tokens": 2049}, "max_tokens"),
    ("max_tokens a float", {**GOOD, "max_tokens": 5.5}, "max_tokens"),
    ("max_tokens a bool", {**GOOD, "max_tokens": True}, "max_tokens"),
    ("max_tokens a string", {**GOOD, "max_tokens": "50"}, "max_tokens"),
    ("temperature negative", {**GOOD, "temperature": -0.1}, "temperature"),
    ("temperature above 2", {**GOOD, "temperature": 2.01}, "temperature"),
    ("temperature NaN", {**GOOD, "temperature": float("nan")}, "temperature"),
    ("temperature a string", {**GOOD, "temperature": "hot"}, "temperature"),
    ("top_p above 1", {**GOOD, "top_p": 1.5}, "top_p"),
    ("top_p infinite", {**GOOD, "top_p": float("inf")}, "top_p"),
    ("stop not a list", {**GOOD, "stop_sequences": "END"}, "stop_sequences"),
    ("eleven stops", {**GOOD, "stop_sequences": [str(i) for i in range(11)]}, "stop_sequences"),
    ("stop not a string", {**GOOD, "stop_sequences": ["a", 3]}, "stop_sequences[1]"),
    ("empty stop", {**GOOD, "stop_sequences": [""]}, "stop_sequences[0]"),
    # Lone surrogates (JSON's "\ud800") cannot be encoded for llama.cpp, SQLite or a reply.
    ("model with a lone surrogate", {**GOOD, "model_name": f"sur{LONE}x"}, "model_name"),
    ("model with a NUL byte", {**GOOD, "model_name": "a\x00"}, "model_name"),
    ("model of 129 bytes", {**GOOD, "model_name": "m" * 129}, "model_name"),
    ("text with a lone surrogate", {**GOOD, "input_text": f"hi {LONE}"}, "input_text"),
    ("stop with a lone surrogate", {**GOOD, "stop_sequences": ["a", LONE]}, "stop_sequences[1]"),
]


@pytest.mark.parametrize(
    ("payload", "field"), [c[1:] for c in BAD_INFER], ids=[c[0] for c in BAD_INFER]
)
def test_a_bad_infer_payload_is_refused_naming_the_field(
    payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema.parse_infer(payload)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_an_infer_payload_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema.parse_infer(["tiny"])  # type: ignore[arg-type]
    assert caught.value.field == "payload"


def test_a_load_payload_maps_legacy_names_onto_the_load_request() -> None:
    req = schema.parse_load(
        {
            "model_name": "m",
            "model_path": "/models/m.gguf",
            "model_type": "gguf",
            "quantization": "Q4_K_M",
            "gpu_layers": -1,
        }
    )
    assert (req.name, req.path, req.backend, req.quantization, req.gpu_layers) == (
        "m",
        "/models/m.gguf",
        "gguf",
        "Q4_K_M",
        -1,
    )


BAD_LOAD: list[tuple[str, dict[str, Any], str]] = [
    ("missing name", {}, "model_name"),
    ("unknown type", {"model_name": "m", "model_type": "onnx"}, "model_type"),
    ("path not a string", {"model_name": "m", "model_path": 3}, "model_path"),
    ("layers below -1", {"model_name": "m", "gpu_layers": -2}, "gpu_layers"),
    ("layers a string", {"model_name": "m", "gpu_layers": "all"}, "gpu_layers"),
    ("pin not a bool", {"model_name": "m", "pin": "yes"}, "pin"),
    ("name with a lone surrogate", {"model_name": f"sur{LONE}x", "model_path": "t.gguf"}, "model_name"),
    ("name with a slash", {"model_name": "a/b", "model_path": "t.gguf"}, "model_name"),
    ("name with a space", {"model_name": "a b"}, "model_name"),
    ("path of 5,000 characters", {"model_name": "m", "model_path": "a/" * 2500}, "model_path"),
    ("path with a lone surrogate", {"model_name": "m", "model_path": f"{LONE}.gguf"}, "model_path"),
    ("quantization with a lone surrogate", {"model_name": "m", "quantization": LONE}, "quantization"),
]


@pytest.mark.parametrize(
    ("payload", "field"), [c[1:] for c in BAD_LOAD], ids=[c[0] for c in BAD_LOAD]
)
def test_a_bad_load_payload_is_refused_naming_the_field(
    payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema.parse_load(payload)
    assert caught.value.field == field
