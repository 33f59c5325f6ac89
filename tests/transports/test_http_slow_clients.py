"""Slow and greedy HTTP clients: the head deadline and the per-address connection cap.

Raw TCP clients against the real aiohttp server, so each test controls every byte and sees
when the server closes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.support import wait_for
from transports.http import HttpServer
from transports.http_guard import AddressCounts

from .conftest import FakeNode, metric

PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: node\r\nX-Slow: "


def test_the_address_cap_admits_up_to_the_limit_and_frees_on_release() -> None:
    counts = AddressCounts(2)
    assert counts.admit("10.0.0.1") and counts.admit("10.0.0.1")
    assert not counts.admit("10.0.0.1")
    assert counts.admit("10.0.0.2")  # another address has its own allowance
    counts.release("10.0.0.1")
    assert counts.held("10.0.0.1") == 1
    assert counts.admit("10.0.0.1")


def test_a_cap_of_zero_admits_everyone() -> None:
    counts = AddressCounts(0)
    assert all(counts.admit("10.0.0.1") for _ in range(1000))


async def closed_within(server: HttpServer, first: bytes, seconds: float) -> tuple[bytes, float]:
    """Connect, send `first`, read until the server closes; return what came and how long."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        if first:
            writer.write(first)
            await writer.drain()
        data = await asyncio.wait_for(reader.read(), seconds)
        return data, time.monotonic() - t0
    finally:
        writer.close()


async def test_fifty_partial_heads_are_closed_at_the_deadline_while_others_are_served(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, header_read_timeout_s=0.5)
    before = metric("moc_http_connections_refused_total", reason="header_timeout")

    stalled = [asyncio.create_task(closed_within(server, PARTIAL_HEAD, 10)) for _ in range(50)]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}/health") as resp,
    ):
        assert resp.status == 200
    results = await asyncio.gather(*stalled)

    assert all(data == b"" for data, _ in results)  # closed without a reply
    assert all(elapsed < 5 for _, elapsed in results)
    after = metric("moc_http_connections_refused_total", reason="header_timeout")
    assert after == before + 50


async def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, header_read_timeout_s=0.3)
    data, elapsed = await closed_within(server, b"", 10)
    assert data == b""
    assert elapsed < 5


async def test_trickling_bytes_does_not_extend_the_deadline(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, header_read_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    t0 = time.monotonic()
    try:
        writer.write(PARTIAL_HEAD)
        for _ in range(100):  # one byte every 50 ms: 5 s if nobody stops it
            if reader.at_eof():
                break
            writer.write(b"a")
            try:
                await writer.drain()
                await asyncio.wait_for(reader.read(1), 0.05)
            except (TimeoutError, ConnectionError):
                continue
    finally:
        writer.close()
    assert time.monotonic() - t0 < 3


async def test_a_request_slower_than_the_head_deadline_is_served_and_the_connection_reused(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, header_read_timeout_s=0.3)
    node.gate = asyncio.Event()
    infer = {"model_name": "tiny", "input_text": "x", "max_tokens": 2}
    created: list[object] = []

    async def on_create(*_: object) -> None:
        created.append(None)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        pending = asyncio.create_task(
            session.post(f"http://127.0.0.1:{server.port}/inference", json=infer)
        )
        await asyncio.wait_for(node.started.wait(), 10)
        await asyncio.sleep(0.6)  # the request is in the handler past two head deadlines
        node.gate.set()
        async with await pending as resp:
            assert resp.status == 200
        async with session.get(f"http://127.0.0.1:{server.port}/health") as resp:
            assert resp.status == 200
    assert len(created) == 1  # the second request went over the first's connection


async def test_past_the_address_cap_a_connection_gets_503_and_is_counted(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, max_connections_per_ip=3, header_read_timeout_s=30)
    before = metric("moc_http_connections_refused_total", reason="too_many_connections")
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
    try:
        data, _ = await closed_within(server, b"", 10)

        assert data.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in data
        assert b'"code":"too_many_connections"' in data
        after = metric("moc_http_connections_refused_total", reason="too_many_connections")
        assert after == before + 1
    finally:
        for _, writer in held[1:]:
            writer.close()

    async def served() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/health") as resp,
        ):
            return resp.status == 200

    # Two slots come free: a new client is served again.
    await wait_for(lambda: server.open_connections("127.0.0.1") == 1, timeout=5.0)
    assert await served()
    held[0][1].close()


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    node: FakeNode, start_http: Any
) -> None:
    server: HttpServer = await start_http(node, keepalive_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: node\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # the reply, then EOF when idle
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 200 ")


async def test_a_refused_connection_takes_no_slot(node: FakeNode, start_http: Any) -> None:
    server: HttpServer = await start_http(node, max_connections_per_ip=1, header_read_timeout_s=30)
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await wait_for(lambda: server.open_connections("127.0.0.1") == 1, timeout=5.0)
    try:
        for _ in range(3):
            data, _ = await closed_within(server, b"", 10)
            assert data.startswith(b"HTTP/1.1 503 ")
        assert server.open_connections("127.0.0.1") == 1
    finally:
        writer.close()
    await wait_for(lambda: server.open_connections("127.0.0.1") == 0, timeout=5.0)
