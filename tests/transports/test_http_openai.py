"""The OpenAI-compatible routes, driven by the official `openai` Python client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from transports.http import HttpServer
from transports.http_openai import _Shape

from .conftest import FakeNode

KEY = "client-key"


@pytest.fixture
async def client(http_server: HttpServer) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: the tests check what the server answered, not the client's persistence.
    c = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{http_server.port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
    )
    yield c
    await c.close()


async def test_models_lists_every_model_of_the_node(client: openai.AsyncOpenAI) -> None:
    listing = await client.models.list()
    assert {m.id for m in listing.data} == {"tiny", "small", "huge"}
    assert (await client.models.retrieve("tiny")).id == "tiny"


async def test_a_completion_returns_text_usage_and_finish_reason(
    client: openai.AsyncOpenAI,
) -> None:
    done = await client.completions.create(model="tiny", prompt="say hi", max_tokens=3)
    assert done.choices[0].text == "Hello, world"
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (
        2,
        3,
        5,
    )
    assert done.object == "text_completion"


async def test_a_stop_sequence_ends_the_completion_with_reason_stop(
    client: openai.AsyncOpenAI,
) -> None:
    done = await client.completions.create(model="tiny", prompt="x", max_tokens=20, stop=["!"])
    assert done.choices[0].text == "Hello, world"
    assert done.choices[0].finish_reason == "stop"


async def test_a_chat_completion_answers_as_the_assistant(
    client: openai.AsyncOpenAI, node: FakeNode
) -> None:
    done = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0.2,
        seed=7,
    )
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == "Hello,"
    sent = node.requests[-1]
    assert [m.role for m in sent.messages or ()] == ["system", "user"]
    assert (sent.params.temperature, sent.params.seed) == (0.2, 7)


async def test_a_streamed_completion_yields_the_same_text_as_the_whole_one(
    client: openai.AsyncOpenAI,
) -> None:
    whole = await client.completions.create(model="tiny", prompt="x", max_tokens=6)
    stream = await client.completions.create(model="tiny", prompt="x", max_tokens=6, stream=True)
    pieces = [chunk.choices[0].text async for chunk in stream]
    assert len(pieces) > 2
    assert "".join(pieces) == whole.choices[0].text


async def test_a_streamed_chat_yields_deltas_then_a_finish_reason_and_usage(
    client: openai.AsyncOpenAI,
) -> None:
    stream = await client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_an_unknown_model_is_a_not_found_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="no-such-model", prompt="x")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=True
        )


async def test_an_out_of_range_parameter_is_a_bad_request_naming_it(
    client: openai.AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt="x", temperature=3.5)
    assert caught.value.param == "temperature"


async def test_overload_reaches_the_client_as_a_503(
    client: openai.AsyncOpenAI, node: FakeNode
) -> None:
    node.capacity = 0
    with pytest.raises(openai.InternalServerError) as caught:
        await client.completions.create(model="tiny", prompt="x")
    assert caught.value.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "2"


async def test_with_keys_the_client_needs_the_right_one(node: FakeNode, start_http: Any) -> None:
    server: HttpServer = await start_http(node, api_keys=(KEY,))
    base = f"http://127.0.0.1:{server.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
    async with openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as good:
        done = await good.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert done.choices[0].message.content == "Hello"


async def test_concurrent_streams_are_served_side_by_side(client: openai.AsyncOpenAI) -> None:
    async def one() -> str:
        stream = await client.completions.create(
            model="tiny", prompt="x", max_tokens=5, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    assert await asyncio.gather(*(one() for _ in range(8))) == ["Hello, world! How"] * 8


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize(
    "text", ["", "plain", 'quo"te\\ and \n', "caf\u00e9 \u2603 \U0001f600", "\x00piece\x00"]
)
def test_a_tokens_chunk_is_the_whole_event_with_only_its_text_encoded_per_token(
    chat: bool, text: str
) -> None:
    shape = _Shape(chat, "id-\x00piece\x00", 1, 'model "m"')
    assert shape.piece(text) == shape.chunk(text, None)
