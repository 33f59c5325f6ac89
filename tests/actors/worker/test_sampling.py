"""The sampler chain's OpenAI parameters on real llama.cpp, through the batching engine.

The tiny generated model's greedy text is printable ASCII, one byte token per character, and
repetitive (actors/gguf_synth.py): every parameter's effect shows in the text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from actors.gguf_synth import BYTE_BASE, N_VOCAB
from actors.types import GenerationParams
from actors.worker.backends import BadRequest
from actors.worker.backends.gguf_engine import Finish, GgufEngine
from actors.worker.backends.sampling import (
    Candidates,
    grammar_of,
    grammar_sampler,
    sampler_chain,
    token_logprobs,
)
from actors.worker.protocol import LoadSpec

PROMPT = "The quick brown fox"
GREEDY = GenerationParams(max_tokens=40, temperature=0.0)
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
ENUM_SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
}


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[GgufEngine]:
    made = GgufEngine.load(
        LoadSpec(backend="gguf", path=str(tiny_gguf), n_ctx=256, n_threads=1), parallel=2
    )
    yield made
    made.close()


def run(engine: GgufEngine, params: GenerationParams, prompt: str = PROMPT) -> Finish:
    ended: list[Finish] = []
    engine.submit(prompt, params, emit=lambda _: None, done=ended.append)
    while engine.has_work():
        engine.step()
    assert len(ended) == 1
    return ended[0]


def byte_token(char: str) -> int:
    return BYTE_BASE + ord(char)


def test_greedy_text_without_parameters_repeats_itself(engine: GgufEngine) -> None:
    text = run(engine, GREEDY).text
    assert len(text) == 40
    assert len(set(text)) < 10  # the baseline the penalties are seen against


@pytest.mark.parametrize(
    "change",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repeat_penalty": 1.5},
    ],
    ids=["frequency", "presence", "repeat"],
)
def test_a_penalty_makes_greedy_text_less_repetitive(
    engine: GgufEngine, change: dict[str, float]
) -> None:
    plain = run(engine, GREEDY).text
    penalised = run(engine, replace(GREEDY, **change)).text  # type: ignore[arg-type]
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))


def test_a_logit_bias_of_100_makes_greedy_output_that_token(engine: GgufEngine) -> None:
    done = run(engine, replace(GREEDY, logit_bias=((byte_token("x"), 100.0),)))
    assert done.text == "x" * 40


def test_a_logit_bias_of_minus_100_bans_the_token(engine: GgufEngine) -> None:
    plain = run(engine, GREEDY).text
    banned = plain[0]
    done = run(engine, replace(GREEDY, logit_bias=((byte_token(banned), -100.0),)))
    assert banned not in done.text
    assert len(done.text) == 40


def test_a_json_schema_makes_greedy_output_json_that_the_schema_accepts(
    engine: GgufEngine,
) -> None:
    for schema in (OK_SCHEMA, ENUM_SCHEMA):
        done = run(engine, replace(GREEDY, max_tokens=100, json_schema=json.dumps(schema)))
        assert done.finish_reason == "stop"  # the grammar ended it, not max_tokens
        value = json.loads(done.text)
        assert set(value) == set(schema["required"])
        assert isinstance(value["ok"], bool)
        if "color" in value:
            assert value["color"] in ("red", "green", "blue")


def test_json_object_makes_greedy_output_a_json_object(engine: GgufEngine) -> None:
    done = run(engine, replace(GREEDY, max_tokens=100, json_schema='{"type": "object"}'))
    assert done.finish_reason == "stop"
    assert isinstance(json.loads(done.text), dict)


def test_a_seeded_draw_with_a_schema_is_still_valid_json(engine: GgufEngine) -> None:
    sampled = GenerationParams(max_tokens=100, temperature=0.8, seed=5)
    done = run(engine, replace(sampled, json_schema=json.dumps(OK_SCHEMA)))
    assert done.finish_reason == "stop"
    assert isinstance(json.loads(done.text)["ok"], bool)


def test_a_logit_bias_outside_the_vocabulary_is_refused_naming_logit_bias(
    engine: GgufEngine,
) -> None:
    import llama_cpp

    lib = llama_cpp.llama_cpp
    vocab = engine._vocab  # the engine's own: no public handle, and none is needed elsewhere
    with pytest.raises(BadRequest) as caught:
        sampler_chain(lib, vocab, replace(GREEDY, logit_bias=((N_VOCAB, 5.0),)), 0)
    assert caught.value.field == "logit_bias"


@pytest.mark.parametrize(
    "schema",
    ['{"type": "nonsense"}', '{"$ref": "#/definitions/missing"}', "not json"],
    ids=["unknown type", "dangling ref", "not json"],
)
def test_a_schema_that_cannot_become_a_grammar_is_refused_at_submit(
    engine: GgufEngine, schema: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        engine.submit("x", replace(GREEDY, json_schema=schema), emit=print, done=print)
    assert caught.value.field == "response_format.json_schema"
    assert not engine.has_work()


def test_no_schema_means_no_grammar() -> None:
    assert grammar_of(GREEDY) is None
    grammar = grammar_of(replace(GREEDY, json_schema=json.dumps(OK_SCHEMA)))
    assert grammar is not None and b"root ::=" in grammar


def test_token_logprobs_are_the_log_softmax_of_the_raw_logits() -> None:
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    expected = logits - np.log(np.exp(logits).sum())
    logprob, top = token_logprobs(logits, 2, 3)
    assert logprob == pytest.approx(expected[2])
    assert [t for t, _ in top] == [1, 2, 0]
    assert [lp for _, lp in top] == pytest.approx([expected[1], expected[2], expected[0]])
    assert token_logprobs(logits, 0, 0)[1] == []


def test_a_request_for_logprobs_gets_one_per_generated_token(engine: GgufEngine) -> None:
    done = run(engine, replace(GREEDY, max_tokens=10, logprobs=2))
    assert done.logprobs is not None and len(done.logprobs) == done.tokens_generated == 10
    assert b"".join(piece for piece, _, _ in done.logprobs).decode() == done.text
    for piece, logprob, top in done.logprobs:
        assert len(top) == 2 and top[0][0] == piece  # greedy: the likeliest token
        assert top[0][1] == pytest.approx(logprob) and logprob <= 0.0
    assert run(engine, GREEDY).logprobs is None


def test_logprobs_of_a_cached_prompt_come_from_its_saved_logits(engine: GgufEngine) -> None:
    params = replace(GREEDY, max_tokens=4, logprobs=1)
    first = run(engine, params, "cached")
    decoded = engine.decoded_tokens
    again = run(engine, params, "cached")
    assert engine.decoded_tokens - decoded == 3  # no prompt token: the first from saved logits
    assert again.logprobs is not None and first.logprobs is not None
    assert [p for p, _, _ in again.logprobs] == [p for p, _, _ in first.logprobs]
    assert [lp for _, lp, _ in again.logprobs] == pytest.approx([lp for _, lp, _ in first.logprobs])


def test_a_grammar_allows_only_the_tokens_that_keep_the_output_valid(engine: GgufEngine) -> None:
    import llama_cpp

    lib = llama_cpp.llama_cpp
    vocab = engine._vocab  # the engine's own, as above
    params = replace(GREEDY, json_schema=json.dumps(OK_SCHEMA))
    grammar = grammar_sampler(lib, vocab, params)
    try:
        candidates = Candidates(lib, N_VOCAB)
        assert candidates.allows(grammar, byte_token("{"))
        assert not candidates.allows(grammar, byte_token("x"))
        lib.llama_sampler_accept(grammar, byte_token("{"))
        assert candidates.allows(grammar, byte_token('"'))
        assert not candidates.allows(grammar, byte_token("{"))
    finally:
        lib.llama_sampler_free(grammar)


def test_a_schema_request_on_a_cached_prompt_is_still_valid_json(engine: GgufEngine) -> None:
    params = replace(GREEDY, max_tokens=100, json_schema=json.dumps(ENUM_SCHEMA))
    first, again = run(engine, params, "same prompt"), run(engine, params, "same prompt")
    assert again.text == first.text and again.finish_reason == "stop"
    assert json.loads(again.text)["color"] in ("red", "green", "blue")
