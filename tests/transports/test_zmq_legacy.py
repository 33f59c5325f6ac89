"""The legacy ZeroMQ front over real sockets, with plain REQ clients as the legacy agents use."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tests.support import wait_for
from transports.zmq_legacy import ZmqServer

from .conftest import FakeNode, legacy_call, metric, raw_call, request, server_config


async def call(ctx: zmq.Context[Any], server: ZmqServer, message: Any) -> Any:
    return await asyncio.to_thread(legacy_call, ctx, server.endpoint, message)


async def test_a_plain_req_client_does_every_legacy_action(
    zmq_server: ZmqServer, zmq_context: zmq.Context[Any]
) -> None:
    health = await call(zmq_context, zmq_server, request("health", request_id="h-1"))
    assert health["success"] is True
    assert health["error"] is None
    assert health["request_id"] == "h-1"
    assert isinstance(health["latency_ms"], float)
    assert health["result"]["status"] == "healthy"
    assert set(health["result"]["components"]) == {"models", "devices"}

    listing = await call(zmq_context, zmq_server, request("list_models"))
    assert {m["model_name"] for m in listing["result"]["models"]} == {"tiny", "small", "huge"}

    loaded = await call(
        zmq_context,
        zmq_server,
        request(
            "load_model",
            {
                "model_name": "custom",
                "model_path": "/models/custom.gguf",
                "model_type": "gguf",
                "quantization": "Q4_0",
                "gpu_layers": 10,
            },
        ),
    )
    assert loaded["success"] is True
    assert loaded["result"]["memory_usage_mb"] == 64.0

    inferred = await call(
        zmq_context,
        zmq_server,
        request(
            "infer",
            {
                "model_name": "custom",
                "input_text": "hi",
                "max_tokens": 4,
                "temperature": 0.1,
                "top_p": 0.5,
                "stop_sequences": ["?"],
            },
            "i-9",
        ),
    )
    assert inferred["success"] is True
    assert inferred["request_id"] == "i-9"
    result = inferred["result"]
    assert result["output_text"] == "Hello, world!"
    assert result["tokens_generated"] == 4
    assert result["model_version"] == "custom-v1"
    assert isinstance(result["latency_ms"], float)

    unloaded = await call(
        zmq_context, zmq_server, request("unload_model", {"model_name": "custom"})
    )
    assert unloaded["success"] is True
    again = await call(zmq_context, zmq_server, request("unload_model", {"model_name": "custom"}))
    assert again["success"] is False
    assert again["error_code"] == "model_not_loaded"

    for action in ("status", "list_devices", "ready"):
        reply = await call(zmq_context, zmq_server, request(action))
        assert reply["success"] is True, action


async def test_a_msgpack_request_is_answered_in_msgpack(
    zmq_server: ZmqServer, zmq_context: zmq.Context[Any]
) -> None:
    def msgpack_call() -> Any:
        sock = zmq_context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            sock.connect(zmq_server.endpoint)
            sock.send(
                msgpack.packb(
                    request(
                        "infer", {"model_name": "tiny", "input_text": "x", "max_tokens": 2}, "m-1"
                    )
                )
            )
            raw = sock.recv()
        finally:
            sock.close()
        assert not raw.startswith(b"{")
        return msgpack.unpackb(raw)

    reply = await asyncio.to_thread(msgpack_call)
    assert reply["success"] is True
    assert reply["request_id"] == "m-1"
    assert reply["result"]["output_text"] == "Hello,"


async def test_fifty_concurrent_req_clients_are_all_served(
    zmq_server: ZmqServer, zmq_context: zmq.Context[Any]
) -> None:
    clients = 50
    barrier = threading.Barrier(clients)

    def client(i: int) -> list[tuple[str, Any]]:
        barrier.wait(timeout=30)  # all 50 sockets talk at once
        out = []
        for j in range(4):
            action = "infer" if (i + j) % 2 else "health"
            payload = {"model_name": "tiny", "input_text": "x", "max_tokens": 1 + i % 3}
            rid = f"{i}-{j}"
            reply = legacy_call(zmq_context, zmq_server.endpoint, request(action, payload, rid))
            out.append((rid, reply))
        return out

    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, client, i) for i in range(clients))
        )
    replies = [pair for per_client in results for pair in per_client]
    assert len(replies) == clients * 4
    for rid, reply in replies:
        assert reply["success"] is True, reply
        assert reply["request_id"] == rid


def _infer(**payload: Any) -> bytes:
    body = {"model_name": "tiny", "input_text": "x", **payload}
    return json.dumps(request("infer", body)).encode()


BAD_INPUTS: list[tuple[str, list[bytes], str, str, str]] = [
    # (id, frames, reply encoding, metric action label, outcome)
    ("not json nor msgpack", [b"hello there"], "json", "none", "bad_frame"),
    ("broken json", [b'{"action": "health"'], "json", "none", "bad_frame"),
    ("broken msgpack", [b"\x82\xa6action"], "msgpack", "none", "bad_frame"),
    ("json not an object", [b"[1, 2, 3]"], "json", "none", "invalid_request"),
    ("msgpack not an object", [msgpack.packb([1, 2])], "msgpack", "none", "invalid_request"),
    ("missing action", [b'{"payload": {}}'], "json", "none", "invalid_request"),
    ("unknown action", [b'{"action": "make_coffee"}'], "json", "unknown", "unknown_action"),
    (
        "action not yet available",
        [b'{"action": "list_jobs"}'],
        "json",
        "list_jobs",
        "not_available",
    ),
    (
        "payload not an object",
        [b'{"action": "infer", "payload": [1]}'],
        "json",
        "infer",
        "invalid_request",
    ),
    ("wrong type", [_infer(max_tokens="50")], "json", "infer", "invalid_request"),
    ("out of range", [_infer(temperature=9)], "json", "infer", "invalid_request"),
    ("text too long", [_infer(input_text="x" * 10_001)], "json", "infer", "invalid_request"),
    ("unknown model", [_infer(model_name="nope")], "json", "infer", "model_not_found"),
    ("oversized frame", [b"{" + b" " * 20_000 + b"}"], "json", "none", "too_large"),
    ("multipart garbage", [b"\x00\x01", b"more", b"frames"], "json", "none", "bad_frame"),
    (
        "json with the action twice",
        [b'{"action": "health", "payload": {}, "action": "unload_model"}'],
        "json",
        "none",
        "bad_frame",
    ),
    (
        "json with a payload key twice",
        [b'{"action": "unload_model", "payload": {"model_name": "x", "model_name": "tiny"}}'],
        "json",
        "none",
        "bad_frame",
    ),
    (
        "msgpack with the action twice",
        [
            b"\x82"
            + msgpack.packb("action")
            + msgpack.packb("health")
            + msgpack.packb("action")
            + msgpack.packb("unload_model")
        ],
        "msgpack",
        "none",
        "bad_frame",
    ),
    (
        # Found by bench/fuzz.py: the action ran, then the reply could not be encoded (500).
        "a request_id with a lone surrogate, refused before the action runs",
        [b'{"action": "infer", "payload": {"model_name": "tiny", "input_text": "hi"},'
         b' "request_id": "\\ud800"}'],
        "json",
        "infer",
        "invalid_request",
    ),
]


@pytest.mark.parametrize(
    ("frames", "encoding", "label", "outcome"),
    [c[1:] for c in BAD_INPUTS],
    ids=[c[0] for c in BAD_INPUTS],
)
async def test_each_bad_input_is_answered_and_counted_while_a_good_client_is_served(
    node: FakeNode,
    start_zmq: Any,
    zmq_context: zmq.Context[Any],
    frames: list[bytes],
    encoding: str,
    label: str,
    outcome: str,
) -> None:
    server: ZmqServer = await start_zmq(node, max_frame_bytes=16_384)
    before = metric("moc_zmq_requests_total", action=label, outcome=outcome)

    raw = await asyncio.to_thread(raw_call, zmq_context, server.endpoint, frames)

    reply = json.loads(raw) if encoding == "json" else msgpack.unpackb(raw)
    assert reply["success"] is False
    assert reply["error_code"] == outcome
    assert reply["error"]
    assert metric("moc_zmq_requests_total", action=label, outcome=outcome) == before + 1
    good = await call(zmq_context, server, request("health"))
    assert good["success"] is True


async def test_a_dealer_client_without_a_delimiter_gets_its_reply(
    zmq_server: ZmqServer, zmq_context: zmq.Context[Any]
) -> None:
    def exchange() -> Any:
        sock = zmq_context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            sock.connect(zmq_server.endpoint)
            sock.send_json(request("health", request_id="d-1"))
            return sock.recv_json()
        finally:
            sock.close()

    reply = await asyncio.to_thread(exchange)
    assert reply["request_id"] == "d-1"
    assert reply["success"] is True


async def test_a_frame_over_the_hard_limit_drops_only_that_peer(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, max_frame_bytes=1024, zmq_max_msg_bytes=2048)

    def send_huge_and_wait_for_disconnect() -> bool:
        sock = zmq_context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        monitor.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            sock.connect(server.endpoint)
            sock.send(b"{" + b" " * 10_000 + b"}")
            while True:  # libzmq on the server closes the connection: wait for that event
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    return True
        finally:
            sock.disable_monitor()
            monitor.close()
            sock.close()

    assert await asyncio.to_thread(send_huge_and_wait_for_disconnect)
    good = await call(zmq_context, server, request("health"))
    assert good["success"] is True


async def test_a_slow_inference_does_not_delay_health_from_another_client(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, max_workers=1)
    node.gate = asyncio.Event()
    slow = asyncio.create_task(
        call(
            zmq_context, server, request("infer", {"model_name": "tiny", "input_text": "x"}, "slow")
        )
    )
    await asyncio.wait_for(node.started.wait(), 10)

    # The only worker slot is taken and the inference hangs; health still comes back.
    health = await call(zmq_context, server, request("health"))
    assert health["success"] is True
    assert not slow.done()

    node.gate.set()
    reply = await asyncio.wait_for(slow, 10)
    assert reply["success"] is True
    assert reply["request_id"] == "slow"


async def test_an_overloaded_model_answers_overloaded_at_once_and_keeps_serving(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node)
    node.capacity = 2
    node.gate = asyncio.Event()
    infer = request("infer", {"model_name": "tiny", "input_text": "x"})
    held = [asyncio.create_task(call(zmq_context, server, infer)) for _ in range(2)]
    await wait_for(lambda: node.in_flight == 2, timeout=10, what="two inferences in flight")
    before = metric("moc_zmq_requests_total", action="infer", outcome="overloaded")

    refused = await call(zmq_context, server, infer)

    assert refused["success"] is False
    assert refused["error"] == "overloaded"
    assert refused["retry_after"] == 2.0
    assert metric("moc_zmq_requests_total", action="infer", outcome="overloaded") == before + 1
    assert (await call(zmq_context, server, request("health")))["success"] is True
    node.gate.set()
    for reply in await asyncio.wait_for(asyncio.gather(*held), 10):
        assert reply["success"] is True


async def test_past_the_pending_limit_the_server_refuses_instead_of_queueing(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, max_workers=1, max_pending=0)
    node.gate = asyncio.Event()
    infer = request("infer", {"model_name": "tiny", "input_text": "x"})
    held = asyncio.create_task(call(zmq_context, server, infer))
    await asyncio.wait_for(node.started.wait(), 10)

    refused = await call(zmq_context, server, infer)

    assert refused["success"] is False
    assert refused["error"] == "overloaded"
    node.gate.set()
    assert (await asyncio.wait_for(held, 10))["success"] is True


async def test_past_the_pending_limit_a_job_query_is_refused_too_as_it_holds_a_thread(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, max_workers=1, max_pending=0)
    node.gate = asyncio.Event()
    held = asyncio.create_task(
        call(zmq_context, server, request("infer", {"model_name": "tiny", "input_text": "x"}))
    )
    await asyncio.wait_for(node.started.wait(), 10)

    for action, payload in (("list_jobs", {}), ("get_goal", {"goal_id": "g-1"})):
        refused = await call(zmq_context, server, request(action, payload))
        assert (refused["success"], refused["error"]) == (False, "overloaded"), action
    node.gate.set()
    assert (await asyncio.wait_for(held, 10))["success"] is True


async def test_stop_lets_an_in_flight_request_finish_before_closing(
    node: FakeNode, zmq_context: zmq.Context[Any]
) -> None:
    server = ZmqServer(node, server_config())
    await server.start()
    node.gate = asyncio.Event()
    pending = asyncio.create_task(
        call(zmq_context, server, request("infer", {"model_name": "tiny", "input_text": "x"}))
    )
    await asyncio.wait_for(node.started.wait(), 10)
    stopping = asyncio.create_task(server.stop())
    node.gate.set()
    await asyncio.wait_for(stopping, 10)
    assert (await asyncio.wait_for(pending, 10))["success"] is True
