"""Requests for names that serve no model leave nothing behind in the node process.

A bulkhead is made on a name's first request, before the manager says whether the name is a
model; label children follow it. Kept, every distinct name a client sends would grow the node
and every /metrics scrape for as long as the node runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from actors.errors import ModelNotFound
from actors.serving.config import BulkheadConfig
from actors.serving.resilience import BulkheadRegistry
from actors.types import GenerationParams, InferRequest
from moc_node.app import Runtime
from moc_node.node import UNKNOWN_MODEL
from tests.moc_node.conftest import make_config

Factory = Callable[..., Runtime]
NAMES = 300


def request(model: str) -> InferRequest:
    return InferRequest(model=model, prompt="hello", params=GenerationParams(max_tokens=1))


def models_in_metrics() -> set[str]:
    """Every `model` label value on the registry's series."""
    return {
        sample.labels["model"]
        for family in REGISTRY.collect()
        for sample in family.samples
        if "model" in sample.labels
    }


def not_found_count() -> float:
    value = REGISTRY.get_sample_value(
        "moc_inference_requests_total", {"model": UNKNOWN_MODEL, "outcome": "model_not_found"}
    )
    return value or 0.0


async def test_hundreds_of_unknown_model_names_leave_no_series_behind_and_are_counted_under_one(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    runtime = runtime_factory(make_config(tmp_path, model_root))
    await runtime.node.start()
    before = not_found_count()
    names = {f"no-such-model-{i}" for i in range(NAMES)}
    for name in names:
        with pytest.raises(ModelNotFound):
            await runtime.node.infer(request(name))
        with pytest.raises(ModelNotFound):
            async for _ in runtime.node.infer_stream(request(name)):
                pass
    assert not names & models_in_metrics()
    assert not_found_count() - before == 2 * NAMES


async def test_forget_drops_an_idle_bulkhead_and_its_series_but_never_a_busy_one() -> None:
    registry = BulkheadRegistry(BulkheadConfig())
    name = "forget-me-when-idle"
    async with registry.get(name).slot():
        registry.forget(name)  # a request is in it: it stays, and so do its series
        assert len(registry) == 1
        assert REGISTRY.get_sample_value("moc_bulkhead_active_requests", {"model": name}) == 1
    registry.forget(name)
    assert len(registry) == 0
    assert name not in models_in_metrics()
    registry.forget(name)  # forgetting twice, or a name never seen, is harmless
    registry.forget("never-asked-for")
    assert registry.get(name).occupancy == 0
    assert REGISTRY.get_sample_value("moc_bulkhead_active_requests", {"model": name}) == 0
