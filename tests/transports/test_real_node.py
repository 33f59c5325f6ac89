"""The fronts against a real Node: real actors, llama.cpp workers, ZeroMQ and HTTP on loopback.

The fake-node tests pin each front's behaviour; these prove that the wiring holds end to end with
the clients the contract names: a plain `zmq.REQ` legacy agent and the official `openai` client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import Any

import aiohttp
import msgpack
import openai
import pytest
import zmq
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from actors.serving.config import BulkheadConfig
from actors.types import GenerationParams, InferRequest
from tests.support import wait_for
from tests.transports.conftest import legacy_call, metric, request
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    MODEL,
    RealNode,
    StartNode,
    outside_model_fixture,
    start_node_fixture,
    tiny_models_fixture,
)

KEY = "real-key"
GREEDY = {"temperature": 0.0, "seed": 1}
LONG = 2000  # tokens: several seconds of generation on the tiny model


@pytest.fixture(scope="module")
def zctx() -> Any:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


async def zcall(ctx: zmq.Context[Any], served: RealNode, message: Any) -> Any:
    """Do one legacy exchange from a worker thread (the servers run on this loop)."""
    return await asyncio.to_thread(legacy_call, ctx, served.endpoint, message)


def infer_payload(**overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model_name": MODEL,
        "input_text": "hello",
        "max_tokens": 4,
        "temperature": 0.0,
    }
    payload.update(overrides)
    return payload


def openai_client(served: RealNode, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=60)


def inference_count(model: str = MODEL) -> float:
    """Requests the node counted for `model`, whatever their outcome."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "moc_inference_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("model") == model
    )


def check_envelope(reply: Any, request_id: str, *, success: bool) -> None:
    assert isinstance(reply, dict)
    assert set(reply) >= {"success", "result", "error", "request_id", "latency_ms"}
    assert reply["success"] is success, reply
    assert reply["request_id"] == request_id
    assert isinstance(reply["latency_ms"], float) and reply["latency_ms"] >= 0
    if success:
        assert reply["error"] is None
    else:
        assert isinstance(reply["error"], str) and reply["error"]


async def open_stream(
    session: aiohttp.ClientSession, served: RealNode, max_tokens: int
) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    """Start a streamed completion and return the response with its first event read."""
    resp = await session.post(
        f"{served.url}/v1/completions",
        json={"model": MODEL, "prompt": "once", "max_tokens": max_tokens, "stream": True, **GREEDY},
    )
    assert resp.status == 200, await resp.text()
    while True:
        line = (await resp.content.readline()).strip()
        if line.startswith(b"data: "):
            return resp, json.loads(line[6:])


async def read_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """Read the rest of a server-sent event stream: the data of each event."""
    events = []
    async for raw in resp.content:
        line = raw.strip()
        if line.startswith(b"data: "):
            events.append(line[6:])
    return events


# ---- legacy ZeroMQ ----


async def test_a_plain_req_client_does_every_legacy_action_on_a_real_node(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node()
    health = await zcall(zctx, served, request("health", request_id="h"))
    check_envelope(health, "h", success=True)
    assert health["result"]["status"] == "healthy"
    assert set(health["result"]["components"]) >= {"devices", "models"}

    infer = await zcall(zctx, served, request("infer", infer_payload(), request_id="i"))
    check_envelope(infer, "i", success=True)
    result = infer["result"]
    assert result["tokens_generated"] == 4 and result["output_text"]
    assert result["model_version"] and result["latency_ms"] > 0

    path = str(served.model_root / "b.gguf")
    load = await zcall(
        zctx,
        served,
        request("load_model", {"model_name": "x", "model_path": path, "model_type": "gguf"}, "l"),
    )
    check_envelope(load, "l", success=True)
    assert load["result"]["memory_usage_mb"] > 0
    assert load["result"]["status"] == "loaded"

    listing = await zcall(zctx, served, request("list_models", request_id="m"))
    check_envelope(listing, "m", success=True)
    states = {m["model_name"]: m["state"] for m in listing["result"]["models"]}
    assert states == {"a": "loaded", "x": "loaded"}

    on_x = await zcall(zctx, served, request("infer", infer_payload(model_name="x"), "ix"))
    check_envelope(on_x, "ix", success=True)

    unload = await zcall(zctx, served, request("unload_model", {"model_name": "x"}, "u"))
    check_envelope(unload, "u", success=True)
    assert unload["result"]["status"] == "unloaded"
    assert "x" not in {m.name for m in served.node.models() if m.state == "loaded"}

    again = await zcall(zctx, served, request("unload_model", {"model_name": "x"}, "u2"))
    check_envelope(again, "u2", success=False)
    assert again["error_code"] == "model_not_loaded"


async def test_a_msgpack_request_is_answered_in_msgpack_by_a_real_node(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node()

    def exchange() -> bytes:
        sock = zctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        try:
            sock.connect(served.endpoint)
            sock.send(msgpack.packb(request("infer", infer_payload(), "mp")))
            data: bytes = sock.recv()
            return data
        finally:
            sock.close()

    raw = await asyncio.to_thread(exchange)
    assert raw[:1] != b"{"
    reply = msgpack.unpackb(raw, raw=False)
    check_envelope(reply, "mp", success=True)
    assert reply["result"]["tokens_generated"] == 4


async def test_fifty_concurrent_req_clients_are_all_answered_by_a_real_node(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node()
    clients = 50
    barrier = threading.Barrier(clients)

    def one(i: int) -> Any:
        barrier.wait(timeout=30)  # every socket sends at once
        action = request("infer", infer_payload(max_tokens=2), f"c{i}")
        if i % 5 == 0:
            action = request("health", request_id=f"c{i}")
        return legacy_call(zctx, served.endpoint, action, timeout_ms=60_000)

    loop = asyncio.get_running_loop()
    # One thread per client: the default executor has too few threads to pass the barrier.
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        replies = await asyncio.gather(
            *(loop.run_in_executor(pool, one, i) for i in range(clients))
        )
    for i, reply in enumerate(replies):
        check_envelope(reply, f"c{i}", success=True)
    assert sum(r["result"].get("tokens_generated") == 2 for r in replies) == 40


async def test_bad_parameters_are_refused_naming_the_field_on_zmq_and_http(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node()
    reply = await zcall(zctx, served, request("infer", infer_payload(temperature=5), "t"))
    check_envelope(reply, "t", success=False)
    assert reply["field"] == "temperature" and "temperature" in reply["error"]

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.url}/inference", json=infer_payload(max_tokens=0)) as resp,
    ):
        body = await resp.json()
        assert resp.status == 400
        assert body["field"] == "max_tokens" and body["success"] is False
    async with openai_client(served) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2, top_p=3.0)
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body.get("param") == "top_p"


async def test_a_model_path_outside_the_model_dirs_is_refused_on_http_and_zmq(
    start_node: StartNode, zctx: zmq.Context[Any], outside_model: Any
) -> None:
    served = await start_node()
    payload = {"model_name": "evil", "model_path": str(outside_model)}
    reply = await zcall(zctx, served, request("load_model", payload, "p"))
    check_envelope(reply, "p", success=False)
    assert reply["error_code"] == "path_not_allowed"
    assert str(outside_model) in reply["error"] or "outside" in reply["error"]

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.url}/models", json=payload) as resp,
    ):
        body = await resp.json()
        assert resp.status == 403
        assert body["code"] == "path_not_allowed" and body["success"] is False
    assert "evil" not in {m.name for m in served.node.models()}


# ---- OpenAI-compatible, with the official client ----


async def test_the_openai_client_completes_chats_and_streams_against_a_real_node(
    start_node: StartNode,
) -> None:
    served = await start_node()
    async with openai_client(served) as client:
        listing = await client.models.list()
        assert MODEL in {m.id for m in listing.data}

        whole = await client.completions.create(
            model=MODEL, prompt="the same prompt", max_tokens=16, temperature=0.0, seed=1
        )
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage is not None and whole.usage.completion_tokens == 16
        stream = await client.completions.create(
            model=MODEL,
            prompt="the same prompt",
            max_tokens=16,
            stream=True,
            temperature=0.0,
            seed=1,
        )
        pieces = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        assert len(pieces) > 1
        assert "".join(pieces) == whole.choices[0].text

        messages: Any = [{"role": "user", "content": "hi"}]
        chat = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0.0, seed=1
        )
        assert chat.choices[0].message.role == "assistant"
        content = chat.choices[0].message.content
        assert content
        chat_stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, stream=True, temperature=0.0, seed=1
        )
        deltas = [c.choices[0].delta.content or "" async for c in chat_stream if c.choices]
        assert "".join(deltas) == content


async def test_an_unknown_model_is_a_404_not_found_error_for_the_openai_client(
    start_node: StartNode,
) -> None:
    served = await start_node()
    async with openai_client(served) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        assert caught.value.status_code == 404
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=True
            )


# ---- auth ----

PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/ready", None),
    ("GET", "/status", None),
    ("GET", "/devices", None),
    ("GET", "/models", None),
    ("POST", "/models", {"model_name": "x"}),
    ("DELETE", "/models/a", None),
    ("POST", "/inference", infer_payload()),
    ("GET", "/learning/jobs", None),
    ("GET", "/goals", None),
    ("GET", "/cluster", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/a", None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
    ),
]


async def test_with_keys_every_protected_route_needs_the_right_key(
    start_node: StartNode,
) -> None:
    served = await start_node(api_keys=(KEY, "other-key"))
    reached = inference_count()
    async with aiohttp.ClientSession() as session:
        for method, path, body in PROTECTED:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                async with session.request(
                    method, served.url + path, json=body, headers=headers
                ) as resp:
                    assert resp.status == 401, (method, path, headers)
        assert inference_count() == reached  # no refused request reached the model
        for path in ("/health", "/metrics"):  # open for probes and Prometheus
            async with session.get(served.url + path) as resp:
                assert resp.status == 200, path
        async with session.post(
            f"{served.url}/inference", json=infer_payload(), headers={"X-API-Key": KEY}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["tokens_generated"] == 4
        async with session.get(f"{served.url}/ready", headers={"X-API-Key": "other-key"}) as resp:
            assert resp.status == 200

    async with openai_client(served, key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    async with openai_client(served, key=KEY) as client:
        done = await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert done.usage is not None and done.usage.completion_tokens == 2


async def test_without_keys_every_route_is_open(start_node: StartNode) -> None:
    served = await start_node()
    async with aiohttp.ClientSession() as session:
        for method, path, _ in PROTECTED:
            if method != "GET":
                continue
            async with session.get(served.url + path) as resp:
                assert resp.status != 401, path
                # Features landing with later issues answer 501 until then, never 401.
                later = path in ("/learning/jobs", "/goals", "/cluster")
                assert resp.status in ((200, 501) if later else (200,)), path
        async with session.post(f"{served.url}/inference", json=infer_payload()) as resp:
            assert resp.status == 200


# ---- streams, disconnects, overload ----


async def test_a_client_hanging_up_mid_stream_stops_the_generation(
    start_node: StartNode,
) -> None:
    served = await start_node()
    cancelled_before = metric("moc_inference_requests_total", model=MODEL, outcome="cancelled")
    tokens_before = metric("moc_inference_tokens_generated_total", model=MODEL)
    closed_before = metric("moc_http_streams_closed_by_client_total")
    async with aiohttp.ClientSession() as session:
        resp, first = await open_stream(session, served, LONG)
        assert first["choices"][0]["finish_reason"] is None
        resp.close()  # hang up: the connection itself goes, not just this response
    await wait_for(
        lambda: (
            metric("moc_inference_requests_total", model=MODEL, outcome="cancelled")
            > cancelled_before
        ),
        timeout=30,
    )
    # The model decodes one request at a time: this one runs only once the worker stopped.
    async with openai_client(served) as client:
        done = await client.completions.create(model=MODEL, prompt="next", max_tokens=4)
    assert done.usage is not None and done.usage.completion_tokens == 4
    generated = metric("moc_inference_tokens_generated_total", model=MODEL) - tokens_before
    assert generated < LONG, "the worker generated the whole stream for nobody"
    assert metric("moc_http_streams_closed_by_client_total") == closed_before + 1
    await wait_for(lambda: served.in_flight() == 0, timeout=5.0)


async def test_past_the_bulkhead_requests_get_503_or_overloaded_until_the_stream_ends(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node(bulkhead=BulkheadConfig(max_concurrent=1, max_queue_size=0))
    rejected_before = metric("moc_bulkhead_rejected_total", model=MODEL)
    async with aiohttp.ClientSession() as session:
        stream, _ = await open_stream(session, served, 1000)
        assert served.in_flight() == 1

        body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
        async with session.post(f"{served.url}/v1/completions", json=body) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            error = (await resp.json())["error"]
            assert error["code"] == "overloaded" and error["type"] == "server_error"
        async with session.post(f"{served.url}/inference", json=infer_payload()) as resp:
            assert resp.status == 503 and "Retry-After" in resp.headers
        reply = await zcall(zctx, served, request("infer", infer_payload(), "o"))
        check_envelope(reply, "o", success=False)
        assert reply["error"] == "overloaded" and reply["retry_after"] > 0
        # Refused without waiting for the slot: the stream still holds it.
        assert served.in_flight() == 1
        assert metric("moc_bulkhead_rejected_total", model=MODEL) - rejected_before == 3

        events = await read_events(stream)
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        stream.close()
        await wait_for(lambda: served.in_flight() == 0, timeout=5.0)

        async with session.post(f"{served.url}/v1/completions", json=body) as resp:
            assert resp.status == 200
    await wait_for(lambda: served.in_flight() == 0, timeout=5.0)
    reply = await zcall(zctx, served, request("infer", infer_payload(), "after"))
    check_envelope(reply, "after", success=True)


async def test_a_finished_inference_has_freed_its_slot_and_counts_as_a_success(
    start_node: StartNode,
) -> None:
    served = await start_node(bulkhead=BulkheadConfig(max_concurrent=1, max_queue_size=0))
    success = metric("moc_inference_requests_total", model=MODEL, outcome="success")
    cancelled = metric("moc_inference_requests_total", model=MODEL, outcome="cancelled")
    params = GenerationParams(max_tokens=2, temperature=0.0)
    await served.node.infer(InferRequest(MODEL, prompt="hi", params=params))
    freed_on_return = served.in_flight() == 0
    await wait_for(lambda: served.in_flight() == 0, timeout=5.0)
    counted = (
        metric("moc_inference_requests_total", model=MODEL, outcome="success") - success,
        metric("moc_inference_requests_total", model=MODEL, outcome="cancelled") - cancelled,
    )
    assert freed_on_return, "a client sending its next request at once would get 503"
    assert counted == (1, 0)


# ---- metrics ----

LEGACY_METRICS = (
    "moc_gpu_total_memory_mb",
    "moc_gpu_used_memory_mb",
    "moc_gpu_utilization_percent",
    "moc_gpu_temperature_celsius",
    "moc_models_loaded_total",
    "moc_model_load_duration_seconds",
    "moc_model_memory_usage_mb",
    "moc_inference_requests_total",
    "moc_inference_latency_seconds",
    "moc_inference_tokens_generated_total",
    "moc_inference_errors_total",
    "moc_rest_requests_total",
    "moc_zmq_requests_total",
    "moc_request_duration_seconds",
    "moc_circuit_breaker_state",
    "moc_bulkhead_active_requests",
    "moc_bulkhead_queued_requests",
)


async def test_metrics_carry_every_legacy_name_a_single_node_has_after_some_traffic(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node()
    await zcall(zctx, served, request("infer", infer_payload(), "m1"))
    # A prompt longer than the context: the worker itself refuses it, an inference error.
    too_long = await zcall(
        zctx, served, request("infer", infer_payload(input_text="x" * 3000), "m2")
    )
    check_envelope(too_long, "m2", success=False)
    assert too_long["field"] == "input_text"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{served.url}/inference", json=infer_payload()) as resp:
            assert resp.status == 200
        async with session.get(f"{served.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)

    def labels_of(name: str) -> list[dict[str, str]]:
        return [
            labels
            for sample_name, all_labels in samples.items()
            if sample_name == name
            or (
                sample_name.startswith(name)
                and sample_name.removeprefix(name) in ("_total", "_bucket", "_count", "_sum")
            )
            for labels in all_labels
        ]

    expected = list(LEGACY_METRICS)
    if all(d.temperature_c is None for d in served.node.devices()):
        expected.remove("moc_gpu_temperature_celsius")  # this host's CPU reports none
    missing = [name for name in expected if not labels_of(name)]
    assert not missing, f"no samples for {missing}"
    assert any(lab.get("model") == MODEL for lab in labels_of("moc_model_memory_usage_mb"))
    assert any(
        lab.get("model") == MODEL and lab.get("error") == "invalid_request"
        for lab in labels_of("moc_inference_errors_total")
    )
    assert any(
        lab.get("action") == "infer" and lab.get("outcome") == "ok"
        for lab in labels_of("moc_zmq_requests_total")
    )
    assert any(
        lab.get("route") == "/inference" and lab.get("status") == "200"
        for lab in labels_of("moc_rest_requests_total")
    )
    assert {lab.get("transport") for lab in labels_of("moc_request_duration_seconds")} >= {
        "zmq",
        "http",
    }
    assert any(lab.get("model") == MODEL for lab in labels_of("moc_circuit_breaker_state"))
