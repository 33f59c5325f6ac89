"""The cluster page is served at / and reads /cluster; it needs no key, /cluster does."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from moc_node.app import Runtime, build_runtime, default_servers
from moc_node.preflight import read_keys
from tests.moc_node.conftest import make_config
from transports.http import HttpServer


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[tuple[Runtime, str]]:
    config = make_config(tmp_path, tmp_path / "models")
    server_config = dataclasses.replace(
        config.server, rest_port=0, zmq_port=0, grpc_port=0, api_keys=("s3cret",)
    )
    config = dataclasses.replace(config, server=server_config)
    runtime = build_runtime(config)
    await runtime.node.start()
    keys = read_keys(config)
    http = default_servers(runtime.node, config, keys)[0].server
    assert isinstance(http, HttpServer)
    await http.start()
    yield runtime, f"http://127.0.0.1:{http.port}"
    await http.stop()
    await runtime.close()


async def test_the_page_and_its_files_are_served_without_a_key(page: tuple[Runtime, str]) -> None:
    _, base = page
    async with aiohttp.ClientSession() as session:
        async with session.get(base + "/") as resp:
            assert resp.status == 200
            assert "<title>moc-node cluster</title>" in await resp.text()
        async with session.get(base + "/static/app.js") as resp:
            assert resp.status == 200
            assert "/cluster" in await resp.text()
        async with session.get(base + "/cluster") as resp:
            assert resp.status == 401
        async with session.get(base + "/cluster", headers={"X-API-Key": "s3cret"}) as resp:
            view = await resp.json()
    assert view["enabled"] is False
    assert view["members"][0]["name"] == "test-node"
    assert view["members"][0]["devices"][0]["name"] == "cpu"
