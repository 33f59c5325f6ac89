"""OpenAI bodies: every key honoured, accepted as asking for nothing, or refused naming it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from actors.errors import InvalidRequest
from actors.types import ChatMessage, GenerationParams
from transports.openai_params import (
    JSON_OBJECT_SCHEMA,
    parse_chat,
    parse_completion,
    parse_embeddings,
)

LONE = "\ud800"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hi", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_a_completion_body_carries_every_honoured_parameter() -> None:
    parsed = parse_completion(
        completion(
            prompt=["hi"],
            stop="\n",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            seed=3,
            temperature=0.5,
            top_p=0.5,
            presence_penalty=-1.5,
            frequency_penalty=2,
            repeat_penalty=1.1,
            logit_bias={"7": 100, "12": -2.5},
            echo=True,
            user="someone",
            n=1,
            best_of=1,
        )
    )
    assert parsed.infer.prompt == "hi"
    assert parsed.infer.params == GenerationParams(
        max_tokens=5,
        temperature=0.5,
        top_p=0.5,
        stop=("\n",),
        seed=3,
        presence_penalty=-1.5,
        frequency_penalty=2.0,
        repeat_penalty=1.1,
        logit_bias=((7, 100.0), (12, -2.5)),
    )
    assert (parsed.stream, parsed.include_usage, parsed.echo) == (True, True, True)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [([1, 72, 105], (1, 72, 105)), ([[72, 105]], (72, 105)), (["hi"], "hi"), ("hi", "hi")],
    ids=["token ids", "one token list in a list", "one string in a list", "a string"],
)
def test_a_completion_prompt_is_text_or_token_ids(prompt: Any, expected: Any) -> None:
    assert parse_completion(completion(prompt=prompt)).infer.prompt == expected


def test_a_chat_body_keeps_the_messages_and_takes_max_completion_tokens() -> None:
    parsed = parse_chat(
        chat(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            max_completion_tokens=7,
            tool_choice="none",
            tools=[],
            logprobs=False,
            store=False,
            parallel_tool_calls=True,
        )
    )
    assert parsed.infer.messages == (
        ChatMessage("system", "be brief"),
        ChatMessage("user", "hi there"),
    )
    assert parsed.infer.params.max_tokens == 7
    assert (parsed.stream, parsed.include_usage) == (False, False)


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, JSON_OBJECT_SCHEMA),
        ({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}}, json.dumps(SCHEMA)),
    ],
    ids=["text", "json_object", "json_schema"],
)
def test_response_format_becomes_the_schema_the_output_must_satisfy(
    response_format: dict[str, Any], schema: str | None
) -> None:
    assert parse_chat(chat(response_format=response_format)).infer.params.json_schema == schema


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("no prompt", {"model": "tiny"}, "prompt"),
    ("two prompts", completion(prompt=["a", "b"]), "prompt"),
    ("an empty prompt list", completion(prompt=[]), "prompt"),
    ("a negative token id", completion(prompt=[1, -2]), "prompt"),
    ("a list of one empty token list", completion(prompt=[[]]), "prompt[0]"),
    ("a prompt with a lone surrogate", completion(prompt=f"a{LONE}"), "prompt"),
    ("an unknown key", completion(temprature=0.5), "temprature"),
    ("an empty key", completion(**{"": 1}), '""'),
    ("a chat-only key on completions", completion(tools=[]), "tools"),
    ("n of 2", completion(n=2), "n"),
    ("n true", completion(n=True), "n"),
    ("best_of 2", completion(best_of=2), "best_of"),
    ("a suffix", completion(suffix="end"), "suffix"),
    ("logprobs past 5", completion(logprobs=6), "logprobs"),
    ("logprobs a boolean on completions", completion(logprobs=True), "logprobs"),
    ("logprobs with stream", completion(logprobs=1, stream=True), "logprobs"),
    ("logprobs with echo", completion(logprobs=1, echo=True), "logprobs"),
    ("echo with token ids", completion(prompt=[1, 2], echo=True), "echo"),
    ("echo not a boolean", completion(echo="yes"), "echo"),
    ("frequency_penalty a string", completion(frequency_penalty="a"), "frequency_penalty"),
    ("frequency_penalty past 2", completion(frequency_penalty=2.5), "frequency_penalty"),
    ("presence_penalty below -2", completion(presence_penalty=-3), "presence_penalty"),
    ("repeat_penalty 0", completion(repeat_penalty=0), "repeat_penalty"),
    ("logit_bias a list", completion(logit_bias=[1]), "logit_bias"),
    ("logit_bias with a word key", completion(logit_bias={"hello": 1}), "logit_bias"),
    ("logit_bias with a negative key", completion(logit_bias={"-1": 1}), "logit_bias"),
    ("logit_bias past 100", completion(logit_bias={"5": 101}), "logit_bias.5"),
    ("logit_bias a string value", completion(logit_bias={"5": "a"}), "logit_bias.5"),
    ("stream_options without stream", completion(stream_options={"include_usage": True}), "stream_options"),
    ("stream_options unknown key", completion(stream=True, stream_options={"x": 1}), "stream_options.x"),
    ("include_usage not a boolean", completion(stream=True, stream_options={"include_usage": 1}), "include_usage"),
    ("user not a string", completion(user=5), "user"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ("tool_choice auto", chat(tool_choice="auto"), "tool_choice"),
    ("functions", chat(functions=[{"name": "f"}]), "functions"),
    ("top_logprobs without logprobs", chat(top_logprobs=3), "top_logprobs"),
    ("top_logprobs past 20", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat logprobs with stream", chat(logprobs=True, stream=True), "logprobs"),
    ("an audio modality", chat(modalities=["text", "audio"]), "modalities"),
    ("store true", chat(store=True), "store"),
    ("echo on chat", chat(echo=True), "echo"),
    ("a response_format type unknown", chat(response_format={"type": "yaml"}), "response_format.type"),
    ("a response_format not an object", chat(response_format="json"), "response_format"),
    (
        "a json_schema without its object",
        chat(response_format={"type": "json_schema"}),
        "response_format.json_schema",
    ),
    (
        "a schema that is not an object",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": True}}),
        "response_format.json_schema.schema",
    ),
    (
        "max_tokens and a different max_completion_tokens",
        chat(max_tokens=3, max_completion_tokens=4),
        "max_completion_tokens",
    ),
    ("no messages", chat(messages=None), "messages"),
    ("a bad role", chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    ("an image part", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0]"),
    ("no model", {"prompt": "a"}, "model"),
    ("a model with a lone surrogate", completion(model=LONE), "model"),
    ("stream not a boolean", completion(stream="yes"), "stream"),
    ("a listed prompt with a lone surrogate", completion(prompt=[LONE]), "prompt"),
    ("a stop with a lone surrogate", completion(stop=LONE), "stop[0]"),
    ("eleven stops", completion(stop=[str(i) for i in range(11)]), "stop"),
    ("empty messages", chat(messages=[]), "messages"),
    ("a message not an object", chat(messages=["hi"]), "messages[0]"),
    ("content a number", chat(messages=[{"role": "user", "content": 1}]), "messages[0].content"),
    (
        "content with a lone surrogate",
        chat(messages=[{"role": "user", "content": f"hi {LONE}"}]),
        "messages[0].content",
    ),
    (
        "a text part with a lone surrogate",
        chat(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
        "messages[0].content[0].text",
    ),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_or_unsupported_key_is_refused_naming_it(body: dict[str, Any], field: str) -> None:
    parse = parse_chat if "messages" in body else parse_completion
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("body", "logprobs"),
    [
        (completion(logprobs=0), 0),
        (completion(logprobs=5), 5),
        (completion(), None),
        (chat(logprobs=True), 0),
        (chat(logprobs=True, top_logprobs=20), 20),
        (chat(logprobs=False, top_logprobs=0), None),
    ],
    ids=["completion 0", "completion 5", "completion none", "chat", "chat top 20", "chat off"],
)
def test_logprobs_ask_for_that_many_alternatives(body: dict[str, Any], logprobs: int | None) -> None:
    parse = parse_chat if "messages" in body else parse_completion
    assert parse(body).infer.params.logprobs == logprobs


def test_an_unknown_key_is_refused_in_openai_words() -> None:
    with pytest.raises(InvalidRequest, match="Unrecognized request argument supplied"):
        parse_chat(chat(foo=1))


@pytest.mark.parametrize(
    ("value", "inputs"),
    [
        ("hello", ("hello",)),
        (["a", "b"], ("a", "b")),
        ([1, 72, 105], ((1, 72, 105),)),
        ([[1, 72], [1, 105]], ((1, 72), (1, 105))),
        (["a", [1, 72]], ("a", (1, 72))),
    ],
    ids=["a string", "strings", "token ids", "token id lists", "a mix"],
)
def test_embeddings_input_is_a_string_token_ids_or_a_list_of_them(
    value: Any, inputs: tuple[Any, ...]
) -> None:
    parsed = parse_embeddings({"model": "tiny", "input": value})
    assert parsed.embed.inputs == inputs
    assert (parsed.base64, parsed.dimensions) == (False, None)


def test_embeddings_take_base64_and_dimensions() -> None:
    parsed = parse_embeddings(
        {"model": "tiny", "input": "x", "encoding_format": "base64", "dimensions": 64, "user": "u"}
    )
    assert (parsed.base64, parsed.dimensions) == (True, 64)


BAD_EMBEDDINGS: list[tuple[str, dict[str, Any], str]] = [
    ("no input", {"model": "tiny"}, "input"),
    ("an empty string", {"model": "tiny", "input": ""}, "input"),
    ("an empty list", {"model": "tiny", "input": []}, "input"),
    ("an empty second string", {"model": "tiny", "input": ["a", ""]}, "input[1]"),
    ("a number in a list of strings", {"model": "tiny", "input": ["a", 5]}, "input[1]"),
    ("too many inputs", {"model": "tiny", "input": ["a"] * 2049}, "input"),
    ("an unknown encoding", {"model": "tiny", "input": "a", "encoding_format": "hex"}, "encoding_format"),
    ("dimensions 0", {"model": "tiny", "input": "a", "dimensions": 0}, "dimensions"),
    ("an unknown key", {"model": "tiny", "input": "a", "truncate": True}, "truncate"),
    ("no model", {"input": "a"}, "model"),
]


@pytest.mark.parametrize(
    ("body", "field"), [c[1:] for c in BAD_EMBEDDINGS], ids=[c[0] for c in BAD_EMBEDDINGS]
)
def test_a_bad_embeddings_body_is_refused_naming_the_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_embeddings(body)
    assert caught.value.field == field
