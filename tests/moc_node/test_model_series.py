"""A model's metric series live exactly as long as the model does on this node.

Series labelled with a model name are made on its load and its requests. Kept after the model
is unloaded (or failed to load), every distinct name a client ever loaded would stay on every
/metrics scrape: about 50 lines a load, 25 a failed one. Counted here in the /metrics text of a
real node (real workers, real HTTP).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from actors.serving import metrics
from actors.serving.config import BulkheadConfig, CircuitBreakerConfig
from actors.serving.resilience import BulkheadRegistry, CircuitBreaker
from moc_node.app import Runtime
from tests.moc_node.conftest import make_config
from transports.http import HttpServer

Factory = Callable[..., Runtime]
NAMES = 4


@pytest.fixture
async def served(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> AsyncIterator[str]:
    """The URL of a real node's HTTP front, with no catalog: every model is loaded by path."""
    config = make_config(tmp_path, model_root)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, rest_port=0))
    runtime = runtime_factory(config)
    await runtime.node.start()
    http = HttpServer(runtime.node, config.server)
    await http.start()
    yield f"http://127.0.0.1:{http.port}"
    await http.stop()


async def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as r:
        return r.status, await r.json()


async def series_of(url: str, name: str) -> list[str]:
    """The lines of the node's /metrics text that carry model `name`."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return [line for line in text.splitlines() if f'model="{name}"' in line]


async def until_no_series(url: str, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lines := await series_of(url, name):
        assert time.monotonic() < deadline, f"{name} still on /metrics: {lines}"
        await asyncio.sleep(0.05)  # polling a condition with a deadline


async def load_use_unload(url: str, name: str) -> int:
    """Load `name` from a.gguf, answer one request, unload it; return its series while loaded."""
    status, body = await call("POST", url + "/models", {"model_name": name, "model_path": "a.gguf"})
    assert status == 201, body
    payload = {"model_name": name, "input_text": "hello", "max_tokens": 2}
    status, body = await call("POST", url + "/inference", payload)
    assert status == 200, body
    loaded = len(await series_of(url, name))
    status, body = await call("DELETE", f"{url}/models/{name}")
    assert status == 200, body
    return loaded


async def test_models_loaded_and_unloaded_under_many_names_leave_no_series_on_metrics(
    served: str,
) -> None:
    names = [f"series-{i}" for i in range(NAMES)]
    for name in names:
        assert await load_use_unload(served, name) >= 20  # histograms, counters, gauges
    for name in names:  # the unload is answered as the model goes: poll a moment
        await until_no_series(served, name)


async def test_a_model_loaded_unloaded_and_loaded_again_still_exports_its_series(
    served: str,
) -> None:
    first = await load_use_unload(served, "again")
    await until_no_series(served, "again")
    assert await load_use_unload(served, "again") == first
    # And while it serves, every request still shows: the second load's children are live.
    await call("POST", served + "/models", {"model_name": "again", "model_path": "a.gguf"})
    for _ in range(2):
        payload = {"model_name": "again", "input_text": "hi", "max_tokens": 1}
        assert (await call("POST", served + "/inference", payload))[0] == 200
    lines = await series_of(served, "again")
    assert 'moc_inference_latency_seconds_count{model="again"} 2.0' in lines
    assert 'moc_inference_requests_total{model="again",outcome="success"} 2.0' in lines
    assert 'moc_bulkhead_active_requests{model="again"} 0.0' in lines


async def test_failed_loads_under_many_names_leave_no_series_on_metrics(
    served: str, model_root: Path
) -> None:
    whole = (model_root / "a.gguf").read_bytes()
    (model_root / "cut.gguf").write_bytes(whole[: len(whole) // 2])  # header fine, tensors cut
    for i in range(NAMES):
        name = f"broken-{i}"
        status, body = await call(
            "POST", served + "/models", {"model_name": name, "model_path": "cut.gguf"}
        )
        assert status >= 400, body
    for i in range(NAMES):  # the failure is answered before the worker is stopped
        await until_no_series(served, f"broken-{i}")
    status, listing = await call("GET", served + "/models")
    assert not [m for m in listing["models"] if m["model_name"].startswith("broken-")]


async def test_a_model_refused_before_it_starts_leaves_no_trace_and_may_be_asked_again(
    served: str, model_root: Path
) -> None:
    (model_root / "junk.gguf").write_bytes(b"not a gguf at all")
    body = {"model_name": "junk", "model_path": "junk.gguf"}
    assert (await call("POST", served + "/models", body))[0] == 400
    status, listing = await call("GET", served + "/models")
    assert "junk" not in {m["model_name"] for m in listing["models"]}
    # The name was not kept with the refused path: asked again without one, it is unknown.
    payload = {"model_name": "junk", "input_text": "hi", "max_tokens": 1}
    assert (await call("POST", served + "/inference", payload))[0] == 404


async def test_a_breaker_and_a_bulkhead_whose_series_were_removed_publish_them_again() -> None:
    # Both outlive a metrics.forget_model when busy: they must never write to a dead child.
    name = "removed-while-held"
    breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1), name)
    bulkheads = BulkheadRegistry(BulkheadConfig())
    bulkhead = bulkheads.get(name)
    metrics.forget_model(name)
    assert REGISTRY.get_sample_value("moc_circuit_breaker_state", {"model": name}) is None
    breaker.record_failure(time.monotonic())
    assert REGISTRY.get_sample_value("moc_circuit_breaker_state", {"model": name}) == 1
    assert REGISTRY.get_sample_value("moc_circuit_breaker_failures_total", {"model": name}) == 1
    async with bulkhead.slot():
        assert REGISTRY.get_sample_value("moc_bulkhead_active_requests", {"model": name}) == 1
    assert REGISTRY.get_sample_value("moc_bulkhead_active_requests", {"model": name}) == 0
