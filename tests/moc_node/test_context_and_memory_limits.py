"""The node refuses a context a model was not trained for, caps its catalog's, and hands the
per-worker memory limit to every model's supervisor (real workers, real llama.cpp)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from actors.errors import InvalidRequest
from actors.serving.model import worker_memory_kills_total
from actors.types import LoadRequest
from moc_node.app import Runtime
from tests.moc_node.conftest import catalog_of, make_config
from tests.support import wait_for

Factory = Callable[..., Runtime]


async def test_a_client_asking_for_a_context_past_the_models_training_is_refused_before_any_claim(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    # The tiny model was trained for 2048 tokens: 1,048,576 would have claimed 14,599 MiB.
    runtime = runtime_factory(make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a")))
    node = runtime.node
    await node.start()
    await node.load(LoadRequest(name="a"))
    claimed = node.devices()[0].claimed_mb
    with pytest.raises(InvalidRequest) as refused:
        await node.load(LoadRequest(name="big", path=str(model_root / "b.gguf"), n_ctx=1_048_576))
    assert refused.value.field == "n_ctx"
    assert "trained for 2048 tokens" in str(refused.value)
    assert node.devices()[0].claimed_mb == claimed  # nothing claimed, nothing evicted
    assert {m.name: m.state for m in node.models()}.get("a") == "loaded"
    info = await node.load(LoadRequest(name="ok", path=str(model_root / "b.gguf"), n_ctx=2048))
    assert info.n_ctx == 2048


async def test_a_catalog_context_past_the_training_is_capped_unless_the_entry_allows_it(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    catalog = (
        *catalog_of(model_root, "a", n_ctx=8192),
        *catalog_of(model_root, "b", n_ctx=4096, n_ctx_max=4096),
    )
    node = runtime_factory(make_config(tmp_path, model_root, catalog=catalog)).node
    await node.start()
    assert (await node.load(LoadRequest(name="a"))).n_ctx == 2048
    assert (await node.load(LoadRequest(name="b"))).n_ctx == 4096


async def test_the_per_worker_memory_limit_reaches_the_models_supervisor(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
    resources = dataclasses.replace(
        config.resources, gpu_poll_interval=0.05, worker_memory_limit_mb=1
    )
    node = runtime_factory(dataclasses.replace(config, resources=resources)).node
    await node.start()
    kills = worker_memory_kills_total.labels("a")
    before = kills._value.get()
    await node.load(LoadRequest(name="a"))
    # Any worker holds more than 1 MiB.
    await wait_for(lambda: kills._value.get() != before, 10, "the worker killed for its memory")
