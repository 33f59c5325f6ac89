"""OpenAI parameters through a real node, with the official `openai` client: honoured or refused.

One node (real actors, a real llama.cpp worker on the generated tiny model, the real HTTP front)
serves the whole module. The tiny model's greedy text is printable ASCII, one byte token per
character (actors/gguf_synth.py), so each parameter's effect shows in the text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio

from actors.gguf_synth import BYTE_BASE, N_VOCAB, write_preset
from actors.serving.config import CatalogEntry
from moc_node.app import build_runtime
from tests.moc_node.conftest import make_config
from tests.transports.conftest import server_config
from transports.http import HttpServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
PROMPT = "The quick brown fox"
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 40}
OK_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[openai.AsyncOpenAI]:
    root = tmp_path_factory.mktemp("openai-models")
    path = write_preset(root / "tiny.gguf", "tiny", seed=1)
    entry = CatalogEntry(name=MODEL, path=str(path), n_ctx=512, preload=True, parallel=2)
    config = make_config(tmp_path_factory.mktemp("openai-node"), root, catalog=(entry,))
    runtime = build_runtime(config)
    http = HttpServer(runtime.node, server_config())
    await http.start()
    await runtime.node.start()
    c = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0, timeout=60
    )
    yield c
    await c.close()
    await http.stop()
    await runtime.close()


async def complete(client: openai.AsyncOpenAI, **params: Any) -> Any:
    return await client.completions.create(model=MODEL, **{"prompt": PROMPT, **GREEDY, **params})


async def refused(client: openai.AsyncOpenAI, chat: bool, **params: Any) -> str | None:
    """Send a request that must be refused; return the parameter the 400 names."""
    with pytest.raises(openai.BadRequestError) as caught:
        if chat:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], **params
            )
        else:
            await complete(client, **params)
    body = caught.value.body
    assert isinstance(body, dict)
    param: str | None = body.get("param")
    return param


async def test_a_frequency_penalty_changes_a_repetitive_greedy_completion(
    client: openai.AsyncOpenAI,
) -> None:
    plain = (await complete(client)).choices[0].text
    assert len(set(plain)) < 10  # repetitive: the penalty has something to act on
    for key in ("frequency_penalty", "presence_penalty"):
        penalised = (await complete(client, **{key: 2.0})).choices[0].text
        assert penalised != plain
        assert len(set(penalised)) > len(set(plain))


async def test_a_logit_bias_of_100_makes_greedy_output_that_token(
    client: openai.AsyncOpenAI,
) -> None:
    done = await complete(client, logit_bias={str(BYTE_BASE + ord("x")): 100})
    assert done.choices[0].text == "x" * 40


async def test_a_logit_bias_outside_the_vocabulary_is_a_400_naming_logit_bias(
    client: openai.AsyncOpenAI,
) -> None:
    assert await refused(client, False, logit_bias={str(N_VOCAB): 5}) == "logit_bias"


async def test_a_json_schema_answer_is_json_that_the_schema_accepts(
    client: openai.AsyncOpenAI,
) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": OK_SCHEMA, "strict": True},
    }
    done = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is it ok?"}],
        temperature=0,
        max_tokens=100,
        response_format=response_format,
    )
    assert done.choices[0].finish_reason == "stop"
    answer = json.loads(done.choices[0].message.content or "")
    assert set(answer) == {"ok"} and isinstance(answer["ok"], bool)


async def test_json_object_answers_a_json_object(client: openai.AsyncOpenAI) -> None:
    json_object = {"response_format": {"type": "json_object"}}  # llama.cpp's extension
    done = await complete(client, max_tokens=100, extra_body=json_object)
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].text), dict)


async def test_a_schema_that_cannot_become_a_grammar_is_a_400_naming_it(
    client: openai.AsyncOpenAI,
) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    assert await refused(client, True, response_format=bad) == "response_format.json_schema"


async def test_a_token_array_prompt_answers_as_its_text_does(client: openai.AsyncOpenAI) -> None:
    text = (await complete(client, prompt="Hello")).choices[0].text
    tokens = [1] + [BYTE_BASE + b for b in b"Hello"]  # BOS, then one byte token per character
    assert (await complete(client, prompt=tokens)).choices[0].text == text
    assert (await complete(client, prompt=[tokens])).choices[0].text == text


async def test_echo_puts_the_prompt_before_the_completion(client: openai.AsyncOpenAI) -> None:
    plain = (await complete(client)).choices[0].text
    assert (await complete(client, echo=True)).choices[0].text == PROMPT + plain
    streamed = await complete(client, echo=True, stream=True)
    assert "".join([c.choices[0].text async for c in streamed]) == PROMPT + plain


async def test_include_usage_ends_the_stream_with_the_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


async def test_completion_logprobs_name_each_token_and_its_likeliest_alternatives(
    client: openai.AsyncOpenAI,
) -> None:
    done = await complete(client, max_tokens=12, logprobs=3)
    choice = done.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == 12 and lp.top_logprobs is not None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0.0
        best = max(top, key=top.__getitem__)  # greedy took the likeliest
        assert (best, top[best]) == (token, pytest.approx(logprob))


async def test_chat_logprobs_come_in_the_chat_shape(client: openai.AsyncOpenAI) -> None:
    done = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    choice = done.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
    plain = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=6
    )
    assert plain.choices[0].logprobs is None


REFUSED: list[tuple[str, bool, dict[str, Any], str]] = [
    ("frequency_penalty a", False, {"frequency_penalty": "a"}, "frequency_penalty"),
    ("presence_penalty 3", True, {"presence_penalty": 3}, "presence_penalty"),
    ("logprobs with stream", False, {"logprobs": 2, "stream": True}, "logprobs"),
    ("top_logprobs without logprobs", True, {"top_logprobs": 2}, "top_logprobs"),
    ("tools", True, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("tool_choice", True, {"tool_choice": "required"}, "tool_choice"),
    ("n 2", True, {"n": 2}, "n"),
    ("best_of 2", False, {"best_of": 2}, "best_of"),
    ("suffix", False, {"suffix": "end"}, "suffix"),
    ("an unknown key", True, {"extra_body": {"mirostat": 2}}, "mirostat"),
    ("a token-array echo", False, {"prompt": [1, 2], "echo": True}, "echo"),
]


@pytest.mark.parametrize(
    ("chat", "params", "param"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
async def test_what_is_not_honoured_is_a_400_naming_the_parameter(
    client: openai.AsyncOpenAI, chat: bool, params: dict[str, Any], param: str
) -> None:
    assert await refused(client, chat, **params) == param
