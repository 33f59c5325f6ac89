"""A real node under a seeded stream of random and mutated frames, good requests interleaved.

The node is the production wiring (`build_runtime`, a llama.cpp worker on a generated tiny GGUF)
served in-process by the real `ZmqServer` and `HttpServer` on free loopback ports. Each bad frame
must be answered (every frame here can be), the answer must be a refusal, and the transport's
request counter must move by exactly what was answered, refusals under a non-success label; good
requests sent in between must all succeed, and the worker must be the one that started.

What counts as "bad" is predicted on the client side with the server's own pure codec steps
(split, decode, parse): a mutated frame that still happens to be a valid request is allowed to
succeed, and the test checks only that it was answered and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

import moc_node
from actors.gguf_synth import write_preset
from actors.serving.config import CatalogEntry
from moc_node.app import Runtime, build_runtime
from tests.moc_node.conftest import make_config
from tests.transports.conftest import server_config
from transports import zmq_codec as zc
from transports.config import ServerConfig
from transports.dispatch import ACTIONS
from transports.errors import BadFrame
from transports.http import HttpServer
from transports.http_middleware import METHODS, UNPARSED_ROUTE
from transports.zmq_legacy import ZmqServer

pytestmark = pytest.mark.timeout(180)

SEED = 0x6D6F63
MODEL = "a"
ZMQ_FRAMES = 2000
HTTP_REQUESTS = 1000
GOOD_EVERY = 8
"""One good request after every this many bad ones."""
REPLY_TIMEOUT_S = 20.0
"""Generous: a mutated infer may ask the tiny model for up to 2048 tokens (a few seconds)."""
STATIC_DIR = Path(moc_node.__file__).with_name("static")


@dataclass
class Served:
    runtime: Runtime
    http: HttpServer
    zmq: ZmqServer
    config: ServerConfig


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """A node with model "a" preloaded, served on free loopback ports without API keys."""
    models = tmp_path / "models"
    models.mkdir()
    write_preset(models / f"{MODEL}.gguf", "tiny", seed=0)
    entry = CatalogEntry(name=MODEL, path=str(models / f"{MODEL}.gguf"), n_ctx=2048, preload=True)
    config = make_config(tmp_path, models, catalog=(entry,))
    config = dataclasses.replace(config, server=server_config())
    runtime = build_runtime(config)
    http = HttpServer(runtime.node, config.server, static_dir=STATIC_DIR)
    zmq_server = ZmqServer(runtime.node, config.server)
    await http.start()
    await zmq_server.start()
    try:
        await runtime.node.start()
        yield Served(runtime, http, zmq_server, config.server)
    finally:
        await http.stop()
        await zmq_server.stop()
        await runtime.close()


def counter_totals(name: str, label: str) -> Counter[str]:
    """Sum a counter of the default registry by one label (its `_total` samples only)."""
    totals: Counter[str] = Counter()
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                totals[sample.labels[label]] += int(sample.value)
    return totals


def label_sets(name: str) -> list[dict[str, str]]:
    """Return the label values of every `_total` sample of a counter."""
    return [
        sample.labels
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name
    ]


def worker_pid(served: Served) -> int | None:
    return next(m.pid for m in served.runtime.node.models() if m.name == MODEL)


# ---- frame generators (seeded, plain random: a bounded run, reproducible from SEED) ----


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Truncate, flip, insert, delete or splice a few bytes of `data`."""
    buf = bytearray(data)
    kind = rng.choice(["truncate", "flip", "insert", "delete", "splice"])
    if kind == "truncate":
        return bytes(buf[: rng.randrange(len(buf))]) if buf else b""
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(buf))
        if kind == "flip" and at < len(buf):
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == "insert":
            buf[at:at] = rng.randbytes(rng.randint(1, 4))
        elif kind == "delete":
            del buf[at : at + rng.randint(1, 4)]
        elif kind == "splice":
            buf[at:] = rng.randbytes(rng.randint(0, 16))
    return bytes(buf)


def legacy(action: str, payload: dict[str, Any], request_id: str) -> dict[str, Any]:
    return {
        "action": action,
        "payload": payload,
        "request_id": request_id,
        "timestamp": "2024-05-01T12:00:00Z",
    }


INFER_1 = {"model_name": MODEL, "input_text": "hello", "max_tokens": 1}
TEMPLATES: list[tuple[str, dict[str, Any]]] = [
    ("health", {}),
    ("list_models", {}),
    ("status", {}),
    ("list_devices", {}),
    ("ready", {}),
    ("infer", INFER_1),
    ("infer", {**INFER_1, "temperature": 0.0, "stop_sequences": ["\n"]}),
    ("load_model", {"model_name": MODEL}),  # already loaded: a 409, never a new worker
    ("list_jobs", {}),
    ("shutdown", {}),
]
GOOD_ZMQ = [("health", {}), ("list_models", {}), ("infer", INFER_1)]


def encode(obj: Any, encoding: str) -> bytes:
    if encoding == "json":
        return json.dumps(obj).encode()
    return bytes(msgpack.packb(obj, use_bin_type=True))


def bad_zmq_message(rng: random.Random, i: int) -> list[bytes]:
    """Return the frames of one random or mutated message (a REQ envelope or none, or several)."""
    action, payload = rng.choice(TEMPLATES)
    valid = encode(legacy(action, payload, f"f-{i}"), rng.choice(["json", "msgpack"]))
    kind = rng.choice(["random", "mutated", "mutated", "mutated", "multipart", "bare", "scalar"])
    if kind == "random":
        return [b"", rng.randbytes(rng.randint(0, 200))]
    if kind == "mutated":
        return [b"", mutate(rng, valid)]
    if kind == "multipart":
        # Several body frames, with or without the REQ delimiter.
        parts = [mutate(rng, valid) for _ in range(rng.randint(2, 4))]
        return ([b""] if rng.random() < 0.5 else []) + parts
    if kind == "bare":
        return [mutate(rng, valid)]  # a DEALER that sends no delimiter
    scalar = rng.choice([[1, 2], "health", 7, None, [legacy("health", {}, "x")], {"action": 1}])
    return [b"", encode(scalar, rng.choice(["json", "msgpack"]))]


def predicted_bad(frames: list[bytes]) -> bool:
    """Tell whether the server must refuse this message (as the ROUTER will see it)."""
    _, body = zc.split_envelope([b"identity", *frames])
    if len(body) != 1:
        return True
    try:
        encoding, obj = zc.decode_frame(body[0])
    except BadFrame:
        return True
    return isinstance(zc.parse_request(obj, encoding)[1], BaseException)


def decode_reply(data: bytes) -> dict[str, Any]:
    reply = json.loads(data) if data[:1] == b"{" else msgpack.unpackb(data, raw=False)
    assert isinstance(reply, dict) and "success" in reply, reply
    return reply


# ---- ZeroMQ ----


async def test_random_and_mutated_zmq_frames_are_answered_counted_and_do_not_disturb_good_requests(
    served: Served,
) -> None:
    rng = random.Random(SEED)
    pid = worker_pid(served)
    before = counter_totals("moc_zmq_requests_total", "outcome")
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    req = ctx.socket(zmq.REQ)
    for sock in (dealer, req):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(served.zmq.endpoint)

    async def over_dealer(frames: list[bytes]) -> dict[str, Any]:
        await dealer.send_multipart(frames)
        reply = await asyncio.wait_for(dealer.recv_multipart(), REPLY_TIMEOUT_S)
        return decode_reply(reply[-1])

    async def over_req(body: bytes) -> dict[str, Any]:
        await req.send(body)
        return decode_reply(await asyncio.wait_for(req.recv(), REPLY_TIMEOUT_S))

    answered: Counter[bool] = Counter()
    bad = good = 0
    try:
        # One frame over the size limit (below libzmq's hard ceiling, so it is read and answered).
        too_large = await over_req(b"{" + b" " * served.config.max_frame_bytes + b"}")
        assert too_large["error_code"] == "too_large"
        answered[False] += 1
        for i in range(ZMQ_FRAMES):
            if i % (GOOD_EVERY + 1) == GOOD_EVERY:
                action, payload = GOOD_ZMQ[good % len(GOOD_ZMQ)]
                message = legacy(action, payload, f"good-{i}")
                encoding = "json" if good % 2 else "msgpack"
                body = encode(message, encoding)
                reply = await (over_req(body) if good % 4 < 2 else over_dealer([b"", body]))
                assert reply["success"] is True, (message, reply)
                assert reply["request_id"] == f"good-{i}"
                good += 1
            else:
                frames = bad_zmq_message(rng, i)
                must_refuse = predicted_bad(frames)
                if len(frames) == 2 and frames[0] == b"" and rng.random() < 0.3:
                    reply = await over_req(frames[1])
                else:
                    reply = await over_dealer(frames)
                if must_refuse:
                    assert reply["success"] is False, (frames, reply)
                    assert reply["error_code"] and reply["error"]
                    bad += 1
            answered[bool(reply["success"])] += 1
    finally:
        dealer.close(0)
        req.close(0)
        ctx.term()

    after = counter_totals("moc_zmq_requests_total", "outcome")
    delta = after - before
    assert delta["ok"] == answered[True]
    assert sum(n for outcome, n in delta.items() if outcome != "ok") == answered[False]
    assert answered[False] >= bad > ZMQ_FRAMES // 2  # the stream was mostly garbage
    assert good == ZMQ_FRAMES // (GOOD_EVERY + 1)
    for labels in label_sets("moc_zmq_requests_total"):
        assert labels["action"] in {*ACTIONS, zc.NO_ACTION, zc.UNKNOWN_ACTION}
    assert worker_pid(served) == pid  # the model's worker never crashed or restarted
    assert served.runtime.node.health().status != "unhealthy"


# ---- HTTP ----


@dataclass(frozen=True, slots=True)
class Exchange:
    """One raw HTTP request and what the test requires of its answer."""

    raw: bytes
    must_fail: bool
    must_succeed: bool = False


ROUTES_POST_JSON: list[tuple[str, dict[str, Any]]] = [
    ("/inference", INFER_1),
    ("/models", {"model_name": MODEL}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    ),
]
ROUTES_ANY = [
    "/health",
    "/ready",
    "/metrics",
    "/status",
    "/devices",
    "/models",
    "/cluster",
    "/learning/jobs",
    "/goals",
    "/v1/models",
    "/v1/models/a",
    "/",
    "/static/app.js",
]
BAD_PATHS = [
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/models/%00",
    "/v1/models/" + "x" * 300,
    "/nope",
    "//",
    "/%ff%fe",
]
GOOD_HTTP: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
    ("POST", "/inference", INFER_1),
]


def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    *,
    content_type: str | None = "application/json",
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in extra or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def bad_exchange(rng: random.Random) -> Exchange:
    """Return one random, mutated or malformed HTTP request."""
    path, valid = rng.choice(ROUTES_POST_JSON)
    good_body = json.dumps(valid).encode()
    kind = rng.choice(
        ["random_body", "mutated_body", "mutated_body", "content_type", "method", "path",
         "huge_header", "many_headers", "request_line", "oversized", "wrong_type"]
    )  # fmt: skip
    if kind == "random_body":
        return Exchange(http_request("POST", path, rng.randbytes(rng.randint(0, 300))), True)
    if kind == "mutated_body":
        # It may still be valid, or go to a route that ignores bodies: answered and counted.
        method = rng.choice(["POST", "POST", "PUT", "DELETE", "GET"])
        target = rng.choice([path, path, rng.choice(ROUTES_ANY)])
        return Exchange(http_request(method, target, mutate(rng, good_body)), False)
    if kind == "content_type":
        # The body is valid JSON: the content type alone decides nothing (answered, counted).
        ctype = rng.choice(["text/plain", "multipart/form-data; boundary=x", "", "\x01", None])
        return Exchange(http_request("POST", path, good_body, content_type=ctype), False)
    if kind == "method":
        method = rng.choice(
            ["FOO", "GETT", "PRI", "M-SEARCH", "get", "TRACE", "CONNECT", "G\x00T", "P@ST", "<>"]
        )
        return Exchange(http_request(method, rng.choice(ROUTES_ANY)), True)
    if kind == "path":
        return Exchange(http_request("GET", rng.choice(BAD_PATHS)), True)
    if kind == "huge_header":
        value = "x" * rng.choice([9000, 20000, 70000])
        return Exchange(http_request("GET", "/health", extra=[("X-Big", value)]), True)
    if kind == "many_headers":
        extra = [(f"X-H{j}", "v") for j in range(rng.choice([200, 1000]))]
        return Exchange(http_request("GET", "/health", extra=extra), True)
    if kind == "request_line":
        junk = rng.choice(
            [rng.randbytes(rng.randint(1, 60)), b"GET / HTTP/9.9", b"GET\t/health", b"\x16\x03\x01"]
        )
        return Exchange(junk.replace(b"\r\n", b"") + b"\r\n\r\n", True)
    if kind == "oversized":
        # The claimed length exceeds the body limit: refused before a byte of it is read.
        length = 50 * 1024 * 1024
        raw = http_request("POST", path).replace(
            b"Content-Length: 0", f"Content-Length: {length}".encode()
        )
        return Exchange(raw, True)
    wrong = rng.choice([[], "text", 5, None, [valid], {"model": 5}, {"model_name": [MODEL]}])
    return Exchange(http_request("POST", path, json.dumps(wrong).encode()), True)


async def exchange(port: int, raw: bytes) -> int:
    """Send one request on its own connection; return the response status."""
    try:
        return await asyncio.wait_for(_exchange(port, raw), REPLY_TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"no answer to {raw[:200]!r}") from None


async def _exchange(port: int, raw: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        # Refused mid-request: the status line may still be readable.
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            None,
        )
        # With a length, read just the body: after refusing a body it did not read, aiohttp
        # keeps the socket open a while (lingering close) for the client to finish sending.
        await (reader.read() if length is None else reader.readexactly(length))
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_random_and_malformed_http_requests_are_answered_counted_and_do_not_disturb_good_ones(
    served: Served,
) -> None:
    rng = random.Random(SEED + 1)
    pid = worker_pid(served)
    before = counter_totals("moc_rest_requests_total", "status")
    statuses: Counter[int] = Counter()
    good = 0
    for i in range(HTTP_REQUESTS):
        if i % (GOOD_EVERY + 1) == GOOD_EVERY:
            method, path, body = GOOD_HTTP[good % len(GOOD_HTTP)]
            raw = http_request(method, path, b"" if body is None else json.dumps(body).encode())
            status = await exchange(served.http.port, raw)
            assert status == 200, (method, path, status)
            good += 1
        else:
            ex = bad_exchange(rng)
            status = await exchange(served.http.port, ex.raw)
            if ex.must_fail:
                assert status >= 400, (ex.raw[:200], status)
        statuses[status] += 1

    after = counter_totals("moc_rest_requests_total", "status")
    delta = after - before
    # Every answer is counted, under its own status, refusals included.
    assert delta == Counter({str(code): n for code, n in statuses.items()})
    assert sum(n for code, n in statuses.items() if code >= 400) > HTTP_REQUESTS // 2
    # Label values stay a bounded set whatever methods and paths the clients invent.
    routes = {r.canonical for r in served.http.app.router.resources()}
    for labels in label_sets("moc_rest_requests_total"):
        assert labels["method"] in {*METHODS, "other"}
        assert labels["route"] in {*routes, "unmatched", UNPARSED_ROUTE}
    assert good == HTTP_REQUESTS // (GOOD_EVERY + 1)
    assert worker_pid(served) == pid
    assert served.runtime.node.health().status != "unhealthy"


def test_the_bad_frame_prediction_agrees_with_the_server_codec() -> None:
    # The prediction is only as good as its premise: good requests are not predicted bad.
    for action, payload in GOOD_ZMQ:
        for encoding in ("json", "msgpack"):
            assert not predicted_bad([b"", encode(legacy(action, payload, "x"), encoding)])
    assert predicted_bad([b"", b"\xc1"])
    assert predicted_bad([b"", b"{}", b"{}"])
