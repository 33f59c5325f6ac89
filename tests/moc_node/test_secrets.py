"""No API key, presented or configured, ever shows in the logs or the metrics."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import aiohttp
import pytest

from moc_node.app import build_runtime
from tests.moc_node.conftest import catalog_of, make_config
from transports.http import HttpServer

SECRET = "s3cret-key-7f1e9a"
WRONG = "wrong-key-c0ffee42"


async def test_keys_never_reach_logs_or_metrics(
    tmp_path: Path, model_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, rest_port=0, api_keys=(SECRET,))
    )
    runtime = build_runtime(config)
    await runtime.node.start()
    http = HttpServer(runtime.node, config.server)
    await http.start()
    base = f"http://127.0.0.1:{http.port}"
    try:
        async with aiohttp.ClientSession() as session:
            for key in (WRONG, SECRET):
                for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
                    body = {"model": "a", "prompt": key, "max_tokens": 2}
                    async with session.post(base + "/v1/completions", json=body, headers=headers):
                        pass
            async with session.get(base + "/metrics") as resp:
                metrics_text = await resp.text()
    finally:
        await http.stop()
        await runtime.close()
    assert "moc_rest_requests_total" in metrics_text
    for key in (SECRET, WRONG):
        assert key not in metrics_text
        assert key not in caplog.text
