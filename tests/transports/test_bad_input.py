"""Bad names, bad files and bad text against a real node: each is a 4xx at once, never a 500,
never a traceback, and the node answers every listing afterwards (issue 13, findings 2 and 8).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq

from moc_node.services import torch_available
from tests.transports.conftest import legacy_call, raw_call, request
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    MODEL,
    N_CTX,
    RealNode,
    StartNode,
    start_node_fixture,
    tiny_models_fixture,
)

LONE = "\\ud800"  # the JSON escape of a lone surrogate, written into raw bodies as is
QUICK_S = 30.0  # a refusal comes at once; the old node made a client wait load_timeout_s (600 s)


@pytest.fixture(scope="module")
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


async def post_raw(served: RealNode, path: str, body: str) -> tuple[int, Any]:
    """POST `body` exactly as written (json= would re-encode the escapes)."""
    async with (
        asyncio.timeout(QUICK_S),
        aiohttp.ClientSession() as session,
        session.post(
            served.url + path, data=body, headers={"Content-Type": "application/json"}
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def get(served: RealNode, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(served.url + path) as resp:
        return resp.status, await resp.text()


async def assert_listings_answer(served: RealNode, zctx: zmq.Context[Any]) -> None:
    """Every listing the old node answered 500 after one bad name answers 200."""
    for path in ("/models", "/status", "/metrics", "/v1/models", "/cluster", "/health"):
        status, text = await get(served, path)
        assert status == 200, (path, text)
    reply = await asyncio.to_thread(legacy_call, zctx, served.endpoint, request("list_models"))
    assert reply["success"] is True, reply


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# ---- finding 2: one name used to break the node until restart ----


async def test_a_model_name_with_a_lone_surrogate_is_refused_at_once_and_the_node_stays_whole(
    start_node: StartNode, zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_node()
    caplog.set_level(logging.INFO)
    caplog.clear()  # what the start logged is not this test's
    body = f'{{"model_name": "sur{LONE}x", "model_path": "b.gguf"}}'
    status, reply = await post_raw(served, "/models", body)
    assert status == 400, reply
    assert (reply["code"], reply["field"]) == ("invalid_request", "model_name")
    assert "lone surrogate" in reply["error"]
    await assert_listings_answer(served, zctx)
    # The same refusal on ZeroMQ, with the same words.
    frame = f'{{"action": "load_model", "payload": {body}, "request_id": "z"}}'.encode()
    answer = json.loads(await asyncio.to_thread(raw_call, zctx, served.endpoint, [frame]))
    assert answer["success"] is False and answer["error"] == reply["error"], answer
    no_tracebacks(caplog)


async def test_a_load_the_state_store_refuses_fails_that_request_and_leaves_no_model_behind(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node()
    claimed_before = sum(d.claimed_mb for d in served.node.devices())
    # A real SQLite refusal of one row, as a full disk or an unencodable value would give.
    db = sqlite3.connect(served.runtime.store.path)
    db.execute(
        "CREATE TRIGGER refuse_b BEFORE INSERT ON loaded_models WHEN NEW.name = 'b' "
        "BEGIN SELECT RAISE(ABORT, 'the disk says no'); END"
    )
    db.commit()
    status, reply = await post_raw(served, "/models", '{"model_name": "b", "model_path": "b.gguf"}')
    assert status == 500, reply
    assert reply["code"] == "state_not_writable" and "the disk says no" in reply["error"]
    await assert_listings_answer(served, zctx)

    def claimed() -> float:
        return sum(d.claimed_mb for d in served.node.devices())

    deadline = asyncio.get_running_loop().time() + QUICK_S
    while claimed() != pytest.approx(claimed_before):  # its worker stops, its claim goes
        assert asyncio.get_running_loop().time() < deadline, claimed()
        await asyncio.sleep(0.05)  # polling a condition with a deadline
    assert {m.name: m.state for m in served.node.models()}.get("b") in (None, "failed")
    db.execute("DROP TRIGGER refuse_b")
    db.commit()
    db.close()
    status, reply = await post_raw(served, "/models", '{"model_name": "b", "model_path": "b.gguf"}')
    assert status == 201, reply


# ---- finding 8: bad files and values were 500s with a traceback each time ----


def _header_only(path: Path, head_count: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (
        ("block_count", 1),
        ("embedding_length", 64),
        ("attention.head_count", head_count),
        ("feed_forward_length", 128),
        ("vocab_size", 256),
    ):
        writer.add_uint32(f"llama.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


BAD_FILES: dict[str, bytes | None] = {
    "empty": b"",
    "three-bytes": b"GGU",
    "text": b"not a model at all\n",
    # one metadata array claiming 2^63 uint32 items
    "huge-array": b"GGUF"
    + struct.pack("<IQQ", 3, 0, 1)
    + struct.pack("<Q", 1)
    + b"x"
    + struct.pack("<IIQ", 9, 4, 1 << 63),
    "zero-heads": None,  # written with the gguf package below
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
async def test_a_file_that_is_not_a_usable_gguf_is_a_400_without_a_traceback(
    start_node: StartNode, zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    served = await start_node()
    caplog.set_level(logging.INFO)
    caplog.clear()  # what the start logged is not this test's
    path = served.model_root / f"bad-{kind}.gguf"  # the shared model dir: a name of its own
    content = BAD_FILES[kind]
    if content is None:
        _header_only(path, head_count=0)
    else:
        path.write_bytes(content)
    status, reply = await post_raw(
        served, "/models", json.dumps({"model_name": f"bad-{kind}", "model_path": path.name})
    )
    assert status == 400, reply
    assert reply["code"] == "model_file_invalid", reply
    await assert_listings_answer(served, zctx)
    no_tracebacks(caplog)
    refusals = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO


async def test_a_path_of_5000_characters_is_a_400_naming_model_path(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_node()
    caplog.clear()
    body = json.dumps({"model_name": "long", "model_path": "a/" * 2500 + "x.gguf"})
    status, reply = await post_raw(served, "/models", body)
    assert (status, reply["field"]) == (400, "model_path"), reply
    no_tracebacks(caplog)


LONE_TEXT: list[tuple[str, str, str, str]] = [
    ("legacy prompt", "/inference", f'{{"model_name": "{MODEL}", "input_text": "a{LONE}"}}', "input_text"),
    (
        "legacy stop",
        "/inference",
        f'{{"model_name": "{MODEL}", "input_text": "a", "stop_sequences": ["{LONE}"]}}',
        "stop_sequences[0]",
    ),
    ("openai prompt", "/v1/completions", f'{{"model": "{MODEL}", "prompt": "{LONE}"}}', "prompt"),
    (
        "openai stop",
        "/v1/completions",
        f'{{"model": "{MODEL}", "prompt": "a", "stop": "{LONE}"}}',
        "stop[0]",
    ),
    (
        "chat message",
        "/v1/chat/completions",
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "{LONE}"}}]}}',
        "messages[0].content",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "field"), [c[1:] for c in LONE_TEXT], ids=[c[0] for c in LONE_TEXT]
)
async def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(
    start_node: StartNode, caplog: pytest.LogCaptureFixture, path: str, body: str, field: str
) -> None:
    served = await start_node()
    caplog.clear()
    status, reply = await post_raw(served, path, body)
    assert status == 400, reply
    named = reply["error"]["param"] if path.startswith("/v1") else reply["field"]
    assert named == field, reply
    no_tracebacks(caplog)


# ---- finding 9 (part): the OpenAI surface names its own fields ----


async def test_a_prompt_longer_than_the_context_is_refused_naming_each_surfaces_own_field(
    start_node: StartNode,
) -> None:
    served = await start_node()
    long_text = "ab " * N_CTX  # about 3 tokens a repeat: well past the context
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": long_text, "max_tokens": 1}, "prompt"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 1},
            "messages",
        ),
        ("/inference", {"model_name": MODEL, "input_text": long_text, "max_tokens": 1}, "input_text"),
    ]
    for path, body, field in cases:
        status, reply = await post_raw(served, path, json.dumps(body))
        assert status == 400, (path, reply)
        named = reply["error"]["param"] if path.startswith("/v1") else reply["field"]
        assert named == field, (path, reply)


# ---- names that jobs and goals choose (learning needs the torch extra) ----

NAMED: list[tuple[str, str, str, str]] = [
    (
        "job output with a NUL byte",
        "/learning/jobs",
        f'{{"model_name": "{MODEL}", "dataset_path": "d.jsonl", "output_name": "a\\u0000b"}}',
        "output_name",
    ),
    (
        "job output of 300 characters",
        "/learning/jobs",
        json.dumps({"model_name": MODEL, "dataset_path": "d.jsonl", "output_name": "o" * 300}),
        "output_name",
    ),
    (
        "job output with a lone surrogate",
        "/learning/jobs",
        f'{{"model_name": "{MODEL}", "dataset_path": "d.jsonl", "output_name": "{LONE}"}}',
        "output_name",
    ),
    ("goal title with a lone surrogate", "/goals", f'{{"title": "t{LONE}", "steps": []}}', "title"),
    (
        "goal description with a lone surrogate",
        "/goals",
        f'{{"title": "t", "description": "{LONE}", "steps": []}}',
        "description",
    ),
]


@pytest.mark.skipif(not torch_available(), reason="the torch extra is not installed")
@pytest.mark.parametrize(
    ("path", "body", "field"), [c[1:] for c in NAMED], ids=[c[0] for c in NAMED]
)
async def test_a_bad_name_for_a_job_or_goal_is_a_400_before_anything_is_stored(
    start_node: StartNode, caplog: pytest.LogCaptureFixture, path: str, body: str, field: str
) -> None:
    served = await start_node()
    caplog.clear()
    status, reply = await post_raw(served, path, body)
    assert (status, reply.get("field")) == (400, field), reply
    status, text = await get(served, path)
    listing = json.loads(text)  # a page: {"jobs": [...], "next_offset": ...}
    assert status == 200 and listing.get("jobs", listing.get("goals")) == [], text
    no_tracebacks(caplog)


async def test_deeply_nested_json_is_a_400_on_http_and_zmq_and_never_reaches_a_store(
    start_node: StartNode, zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_node()
    caplog.clear()
    deep = "[" * 5000 + "]" * 5000
    status, reply = await post_raw(served, "/inference", deep)
    assert (status, reply.get("field")) == (400, "body"), reply
    frame = f'{{"action": "infer", "payload": {deep}, "request_id": "d"}}'.encode()
    answer = json.loads(await asyncio.to_thread(raw_call, zctx, served.endpoint, [frame]))
    assert answer["success"] is False, answer
    if torch_available():  # parses (or nearly): stored, it would be echoed by every listing
        nested = "[" * 950 + "]" * 950
        body = f'{{"title": "t", "steps": [{{"kind": "deploy", "model": "{MODEL}"}}], '
        body += f'"metadata": {{"x": {nested}}}}}'
        status, reply = await post_raw(served, "/goals", body)
        assert status == 400 and reply.get("field") in ("body", "metadata"), reply
    await assert_listings_answer(served, zctx)
    no_tracebacks(caplog)
