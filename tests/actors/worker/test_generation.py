"""A request keeps one shape from the wire to the backend, with its defaults written once."""

from __future__ import annotations

import pytest

from actors.types import DEFAULT_N_CTX, ChatMessage, GenerationParams, InferRequest
from actors.worker.backends import BadRequest, Generation, check_generation, generation_of
from actors.worker.channel import infer_message
from actors.worker.protocol import Infer, LoadSpec, decode, encode


def test_a_request_reaches_the_backend_with_the_parameters_it_was_sent_with() -> None:
    params = GenerationParams(max_tokens=7, temperature=0.3, top_p=0.5, stop=("\n",), seed=9)
    req = InferRequest(model="m", messages=(ChatMessage("user", "hi"),), params=params)
    sent = decode(encode(infer_message(4, req, stream=True)))
    assert isinstance(sent, Infer) and (sent.request_id, sent.stream) == (4, True)
    assert generation_of(sent) == Generation(None, req.messages, None, params)


def test_a_request_that_names_no_parameters_gets_the_same_defaults_everywhere() -> None:
    sent = decode(encode(infer_message(1, InferRequest(model="m", prompt="x"), stream=False)))
    assert isinstance(sent, Infer)
    assert generation_of(sent).params == GenerationParams() == Generation(prompt="x").params


@pytest.mark.parametrize(
    ("gen", "field"),
    [
        (Generation(prompt="a", params=GenerationParams(max_tokens=0)), "max_tokens"),
        (Generation(prompt="a", params=GenerationParams(temperature=-1.0)), "temperature"),
        (Generation(prompt="a", params=GenerationParams(temperature=100.5)), "temperature"),
        (Generation(prompt="a", params=GenerationParams(top_p=1.5)), "top_p"),
        (Generation(), "prompt"),
        (Generation(prompt="a", messages=(ChatMessage("user", "b"),)), "prompt"),
    ],
    ids=[
        "max-tokens-zero",
        "negative-temperature",
        "temperature-past-100",
        "top-p-above-one",
        "no-input",
        "two-inputs",
    ],
)
def test_parameters_no_backend_can_honour_are_refused_naming_the_field(
    gen: Generation, field: str
) -> None:
    with pytest.raises(BadRequest) as err:
        check_generation(gen)
    assert err.value.field == field


def test_a_tensor_request_is_not_held_to_the_text_parameters() -> None:
    check_generation(Generation(tensors=(), params=GenerationParams(max_tokens=0)))


@pytest.mark.parametrize(
    ("kind", "on_gpu"),
    [("nvml", True), ("cpu", False), ("simulated", False)],
    ids=["nvml", "cpu", "simulated"],
)
def test_only_an_nvml_device_puts_the_model_on_a_gpu(kind: str, on_gpu: bool) -> None:
    assert LoadSpec("gguf", "/m.gguf", device_kind=kind).on_gpu is on_gpu  # type: ignore[arg-type]


def test_a_load_that_names_no_context_gets_the_one_default() -> None:
    assert LoadSpec("gguf", "/m.gguf").n_ctx == DEFAULT_N_CTX
