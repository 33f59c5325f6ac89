"""The HTTP front over a real port: legacy REST, auth, limits, streaming, overload, metrics."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest

from actors.errors import WorkerCrashed
from tests.support import wait_for
from transports.http import HttpServer, build_app

from .conftest import FakeNode, metric, server_config

KEY = "s3cret-key"


def url(server: HttpServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def fetch(
    server: HttpServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url(server, path), json=body, headers=headers) as resp,
    ):
        raw = await resp.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode()
        return resp.status, dict(resp.headers), data


INFER = {"model_name": "tiny", "input_text": "hello", "max_tokens": 3}


async def test_health_reports_components_and_turns_503_when_unhealthy(
    node: FakeNode, http_server: HttpServer
) -> None:
    status, _, body = await fetch(http_server, "GET", "/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert body["components"]["devices"] == {"status": "healthy", "detail": ""}
    assert re.match(r"\d{4}-\d\d-\d\dT", body["timestamp"])
    node.health_status = "unhealthy"
    status, _, body = await fetch(http_server, "GET", "/health")
    assert (status, body["status"]) == (503, "unhealthy")


async def test_ready_is_503_until_the_node_is_ready(
    node: FakeNode, http_server: HttpServer
) -> None:
    node.ready = False
    assert (await fetch(http_server, "GET", "/ready"))[:3:2] == (503, {"ready": False})
    node.ready = True
    assert (await fetch(http_server, "GET", "/ready"))[:3:2] == (200, {"ready": True})


async def test_legacy_inference_returns_the_result_fields(http_server: HttpServer) -> None:
    status, _, body = await fetch(http_server, "POST", "/inference", INFER)
    assert status == 200
    assert body["output_text"] == "Hello, world"
    assert body["tokens_generated"] == 3
    assert body["model_version"] == "tiny-v1"
    assert isinstance(body["latency_ms"], float)


async def test_legacy_inference_refuses_a_bad_field_with_400_naming_it(
    http_server: HttpServer,
) -> None:
    status, _, body = await fetch(http_server, "POST", "/inference", {**INFER, "top_p": 3})
    assert status == 400
    assert body["field"] == "top_p"
    assert body["code"] == "invalid_request"


async def test_the_model_lifecycle_uses_the_legacy_status_codes(http_server: HttpServer) -> None:
    status, _, body = await fetch(http_server, "POST", "/models", {"model_name": "small"})
    assert (status, body["memory_usage_mb"]) == (201, 64.0)
    assert (await fetch(http_server, "POST", "/models", {"model_name": "small"}))[0] == 409
    assert (await fetch(http_server, "POST", "/models", {"model_name": "huge"}))[0] == 507
    outside = {"model_name": "x", "model_path": "/etc/passwd"}
    assert (await fetch(http_server, "POST", "/models", outside))[0] == 403
    status, _, body = await fetch(http_server, "GET", "/models")
    assert status == 200
    assert {m["name"]: m["state"] for m in body["models"]}["small"] == "loaded"
    assert (await fetch(http_server, "DELETE", "/models/small"))[0] == 200
    assert (await fetch(http_server, "DELETE", "/models/small"))[0] == 404
    assert (await fetch(http_server, "POST", "/inference", {**INFER, "model_name": "nope"}))[
        0
    ] == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/learning/jobs"),
        ("POST", "/learning/jobs"),
        ("GET", "/goals"),
        ("POST", "/goals"),
    ],
)
async def test_features_not_landed_yet_answer_501_never_a_fake_result(
    http_server: HttpServer, method: str, path: str
) -> None:
    status, _, body = await fetch(http_server, method, path, {})
    assert status == 501
    assert "not available yet" in body["error"]


async def test_cluster_describes_the_members_and_model_holders(http_server: HttpServer) -> None:
    status, _, body = await fetch(http_server, "GET", "/cluster")
    assert status == 200
    assert body["self"] == "fake-node" and body["primary"] is None
    assert [m["name"] for m in body["members"]] == ["fake-node"]


async def test_status_and_devices_describe_the_node(http_server: HttpServer) -> None:
    status, _, body = await fetch(http_server, "GET", "/status")
    assert (status, body["name"]) == (200, "fake-node")
    status, _, body = await fetch(http_server, "GET", "/devices")
    assert [d["label"] for d in body["devices"]] == ["cpu", "sim0 (simulated)"]


async def test_unknown_routes_get_a_json_404(http_server: HttpServer) -> None:
    status, _, body = await fetch(http_server, "GET", "/nope")
    assert (status, body["code"]) == (404, "not_found")
    status, _, body = await fetch(http_server, "GET", "/v1/nope")
    assert (status, body["error"]["code"]) == (404, "not_found")


async def test_metrics_expose_the_transport_names_and_count_requests(
    http_server: HttpServer,
) -> None:
    before = metric("moc_rest_requests_total", method="POST", route="/inference", status="200")
    await fetch(http_server, "POST", "/inference", INFER)
    status, headers, text = await fetch(http_server, "GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    for name in (
        "moc_rest_requests_total",
        "moc_zmq_requests_total",
        "moc_request_duration_seconds_bucket",
    ):
        assert name in text
    assert (
        metric("moc_rest_requests_total", method="POST", route="/inference", status="200")
        == before + 1
    )
    assert (
        metric(
            "moc_request_duration_seconds_count",
            transport="http",
            action="POST /inference",
            outcome="ok",
        )
        >= 1
    )


# ---- auth ----


def protected_routes() -> list[tuple[str, str]]:
    """Every route of the app except the open ones, with path parameters filled in."""
    app = build_app(FakeNode(), server_config(api_keys=(KEY,)))
    routes = set()
    for route in app.router.routes():
        path = re.sub(r"\{[^}]+\}", "tiny", route.resource.canonical)  # type: ignore[union-attr]
        if path in ("/health", "/metrics"):
            continue
        routes.add(("GET" if route.method == "*" else route.method, path))
    return sorted(routes)


PROTECTED = protected_routes()


async def test_with_keys_every_protected_route_refuses_a_missing_or_wrong_key(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, api_keys=(KEY,))
    assert len(PROTECTED) >= 15
    for method, path in PROTECTED:
        for headers in (
            {},
            {"X-API-Key": "wrong"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
        ):
            status, resp_headers, body = await fetch(server, method, path, {}, headers)
            assert status == 401, (method, path, headers)
            assert resp_headers.get("WWW-Authenticate") == "Bearer"
            if method != "HEAD":
                error = body["error"]
                message = error["message"] if path.startswith("/v1/") else error
                assert KEY not in json.dumps(body)
                assert "API key" in message


async def test_with_keys_the_right_key_passes_in_either_header_and_open_paths_need_none(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, api_keys=(KEY, "other-key"))
    assert (await fetch(server, "POST", "/inference", INFER, {"X-API-Key": KEY}))[0] == 200
    assert (await fetch(server, "GET", "/v1/models", None, {"Authorization": f"Bearer {KEY}"}))[
        0
    ] == 200
    assert (await fetch(server, "GET", "/models", None, {"X-API-Key": "other-key"}))[0] == 200
    assert (await fetch(server, "GET", "/health"))[0] == 200
    assert (await fetch(server, "GET", "/metrics"))[0] == 200


async def test_without_keys_every_route_is_open(http_server: HttpServer) -> None:
    for method, path in PROTECTED:
        status, _, _ = await fetch(http_server, method, path, {})
        assert status != 401, (method, path)


# ---- limits ----


async def test_a_body_over_the_limit_is_refused_with_413(node: FakeNode, start_http: Any) -> None:
    server: HttpServer = await start_http(node, max_body_bytes=2048)
    big = {**INFER, "input_text": "x" * 5000}
    status, _, body = await fetch(server, "POST", "/inference", big)
    assert (status, body["code"]) == (413, "too_large")
    status, _, body = await fetch(
        server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x" * 5000}
    )
    assert (status, body["error"]["code"]) == (413, "too_large")


async def test_a_body_that_is_not_json_is_refused_with_400(http_server: HttpServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url(http_server, "/inference"), data=b"{not json") as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["field"] == "body"


async def test_a_client_that_stalls_while_sending_its_body_gets_408(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, body_read_timeout_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"POST /inference HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model_name"'
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == b"408"


# ---- overload and failures ----


async def test_overload_is_answered_503_with_retry_after_at_once_while_the_node_keeps_serving(
    node: FakeNode, http_server: HttpServer
) -> None:
    node.capacity = 1
    node.gate = asyncio.Event()
    held = asyncio.create_task(fetch(http_server, "POST", "/inference", INFER))
    await asyncio.wait_for(node.started.wait(), 10)

    for path, body in (
        ("/inference", INFER),
        ("/v1/completions", {"model": "tiny", "prompt": "x"}),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}),
    ):
        status, headers, reply = await fetch(http_server, "POST", path, body)
        assert status == 503, path
        assert headers["Retry-After"] == "2"
    assert (await fetch(http_server, "GET", "/health"))[0] == 200

    node.gate.set()
    assert (await asyncio.wait_for(held, 10))[0] == 200


async def test_a_worker_crash_is_a_500_with_its_own_code(
    node: FakeNode, http_server: HttpServer
) -> None:
    node.fail = WorkerCrashed("worker for 'tiny' died (signal 9)")
    status, _, body = await fetch(http_server, "POST", "/inference", INFER)
    assert (status, body["code"]) == (500, "worker_crashed")


async def test_an_inference_past_the_request_timeout_is_a_504(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, request_timeout_s=0.1)
    node.gate = asyncio.Event()
    status, _, body = await fetch(server, "POST", "/inference", INFER)
    assert (status, body["code"]) == (504, "timeout")
    assert node.inference_cancelled.is_set()


# ---- streaming ----


async def test_a_stream_is_server_sent_events_ending_in_done(http_server: HttpServer) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url(http_server, "/v1/completions"), json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = (await resp.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_a_client_that_disconnects_mid_stream_closes_the_node_stream(
    node: FakeNode, http_server: HttpServer
) -> None:
    node.gate = asyncio.Event()  # after the first piece the "model" waits: only the client leaves
    before = metric(
        "moc_rest_requests_total", method="POST", route="/v1/chat/completions", status="499"
    )
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    session = aiohttp.ClientSession()
    resp = await session.post(url(http_server, "/v1/chat/completions"), json=body)
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: ")
    assert not node.stream_closed.is_set()

    resp.close()  # drop the connection mid-stream
    await session.close()

    await asyncio.wait_for(node.stream_closed.wait(), 10)
    assert node.in_flight == 0
    await wait_for(
        lambda: (
            metric(
                "moc_rest_requests_total", method="POST", route="/v1/chat/completions", status="499"
            )
            == before + 1
        ),
        timeout=5.0,
    )


async def test_a_client_that_hangs_up_during_a_whole_inference_cancels_it(
    node: FakeNode, http_server: HttpServer
) -> None:
    node.gate = asyncio.Event()  # the "model" never finishes on its own
    request = asyncio.create_task(fetch(http_server, "POST", "/inference", INFER))
    await asyncio.wait_for(node.started.wait(), 10)

    request.cancel()  # closes the client's connection

    await asyncio.wait_for(node.inference_cancelled.wait(), 10)
    await wait_for(lambda: node.in_flight == 0, timeout=5.0)


async def test_a_wrong_method_is_a_json_405_that_names_the_allowed_ones(
    http_server: HttpServer,
) -> None:
    status, headers, body = await fetch(http_server, "PUT", "/inference", {})
    assert (status, body["code"]) == (405, "method_not_allowed")
    assert "POST" in headers["Allow"]


async def test_a_client_that_stops_reading_mid_stream_is_dropped_and_generation_stops(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, stream_write_timeout_s=0.3)
    node.tokens = ("x" * 65_536,)  # 2048 such pieces are far more than the socket buffers hold
    before = metric("moc_http_streams_closed_by_client_total")
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2048, "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"200"

    # The client reads nothing more: the server's writes stall until its timeout drops us.
    await asyncio.wait_for(node.stream_closed.wait(), 30)
    assert metric("moc_http_streams_closed_by_client_total") == before + 1
    assert node.in_flight == 0
    writer.close()


async def test_an_error_after_the_stream_started_is_sent_as_an_error_event(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, request_timeout_s=0.3)
    node.gate = asyncio.Event()  # never released: the deadline passes mid-stream
    body = {"model": "tiny", "prompt": "hi", "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url(server, "/v1/completions"), json=body) as resp,
    ):
        text = (await resp.read()).decode()
    assert resp.status == 200
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert json.loads(events[-2])["error"]["code"] == "timeout"
    assert events[-1] == "[DONE]"
    assert node.stream_closed.is_set()
