"""The Node over real actors, real worker processes and real llama.cpp on generated models."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from actors.errors import (
    InsufficientMemory,
    InvalidRequest,
    ModelAlreadyLoaded,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    PathNotAllowed,
    ShuttingDown,
    WorkerCrashed,
)
from actors.serving.config import BulkheadConfig, SimulatedDevice
from actors.types import GenerationParams, InferRequest, InferResult, LoadRequest, TokenChunk
from moc_node.app import Runtime
from moc_node.config import Config
from tests.moc_node.conftest import CountingWorkers, catalog_of, make_config
from tests.support import wait_for

GREEDY = GenerationParams(max_tokens=8, temperature=0.0, seed=1)
Factory = Callable[..., Runtime]


def request(model: str, text: str = "hello", **params: object) -> InferRequest:
    p = dataclasses.replace(GREEDY, **params)  # type: ignore[arg-type]
    return InferRequest(model=model, prompt=text, params=p)


async def started(factory: Factory, config: Config) -> Runtime:
    runtime = factory(config)
    await runtime.node.start()
    return runtime


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it must have been reaped too
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(") ")[1][0] != "Z"




async def test_a_cold_catalog_model_loads_on_first_request_and_answers(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (
        await started(
            runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        )
    ).node
    assert [m.state for m in node.models()] == ["available"]
    result = await node.infer(request("a"))
    assert result.tokens_generated == 8
    assert result.finish_reason == "length"
    assert result.text
    (info,) = node.models()
    assert info.state == "loaded"
    assert info.memory_mb and info.memory_mb > 0
    assert info.estimate_mb and info.estimate_mb > 0
    assert node.devices()[0].claimed_mb == max(info.memory_mb, info.estimate_mb)


async def test_streamed_pieces_add_up_to_the_whole_greedy_text(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (
        await started(
            runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        )
    ).node
    whole = await node.infer(request("a", "the same prompt"))
    pieces: list[str] = []
    final: InferResult | None = None
    async for item in node.infer_stream(request("a", "the same prompt")):
        if isinstance(item, TokenChunk):
            pieces.append(item.text)
        else:
            final = item
    assert final is not None
    assert "".join(pieces) == final.text == whole.text


async def test_twenty_concurrent_requests_for_a_cold_model_share_one_load(
    tmp_path: Path, model_root: Path, runtime_factory: Factory, workers: CountingWorkers
) -> None:
    node = (
        await started(
            runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        )
    ).node
    results = await asyncio.gather(*(node.infer(request("a", f"prompt {i}")) for i in range(20)))
    assert len(results) == 20 and all(r.tokens_generated == 8 for r in results)
    assert workers.started == ["a"]


async def test_an_explicit_load_of_a_loaded_model_is_a_conflict(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (
        await started(
            runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        )
    ).node
    info = await node.load(LoadRequest(name="a"))
    assert info.state == "loaded"
    with pytest.raises(ModelAlreadyLoaded):
        await node.load(LoadRequest(name="a"))


async def test_loads_by_path_are_refused_outside_the_model_dirs(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (await started(runtime_factory, make_config(tmp_path, model_root))).node
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes((model_root / "a.gguf").read_bytes())
    with pytest.raises(PathNotAllowed):
        await node.load(LoadRequest(name="x", path=str(outside)))
    with pytest.raises(PathNotAllowed):
        await node.load(LoadRequest(name="x", path=str(model_root / ".." / "elsewhere.gguf")))
    info = await node.load(LoadRequest(name="x", path="a.gguf"))
    assert info.state == "loaded"


async def test_unknown_models_and_bad_load_parameters_get_clear_errors(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (await started(runtime_factory, make_config(tmp_path, model_root))).node
    with pytest.raises(ModelNotFound, match="not in the catalog"):
        await node.infer(request("nope"))
    with pytest.raises(InvalidRequest) as bad:
        await node.load(LoadRequest(name="x", path="a.gguf", n_ctx=3))
    assert bad.value.field == "n_ctx"
    with pytest.raises(ModelNotLoaded):
        await node.unload("nope")


async def test_kill_9_of_a_worker_fails_only_the_request_in_flight_and_it_restarts(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    # A context long enough that the stream is still running when the kill lands.
    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a", n_ctx=2048))
    node = (await started(runtime_factory, config)).node
    await node.load(LoadRequest(name="a"))
    pid = node.models()[0].pid
    assert pid is not None
    stream = node.infer_stream(request("a", max_tokens=2000))
    first = await stream.__anext__()  # generation is under way
    assert isinstance(first, TokenChunk)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed, match="died"):
        async for _ in stream:
            pass
    result = await node.infer(request("a"))  # served by a fresh worker
    assert result.tokens_generated == 8
    new_pid = node.models()[0].pid
    assert new_pid != pid and not pid_alive(pid)
    assert node.models()[0].breaker == "closed"


async def test_one_worker_death_fails_every_request_in_flight_but_counts_once_for_the_breaker(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    # A context long enough for the 2000-token stream to outlast the queueing below (at 256
    # tokens it ended in a few tens of ms, and on a busy machine before the five were admitted).
    catalog = catalog_of(model_root, "a", n_ctx=2048)
    config = make_config(tmp_path, model_root, catalog=catalog)
    config = dataclasses.replace(
        config,
        resilience=dataclasses.replace(
            config.resilience, bulkhead=BulkheadConfig(max_concurrent=8, max_queue_size=8)
        ),
    )
    node = (await started(runtime_factory, config)).node
    await node.load(LoadRequest(name="a"))
    pid = node.models()[0].pid
    assert pid is not None
    stream = node.infer_stream(request("a", max_tokens=2000))
    assert isinstance(await stream.__anext__(), TokenChunk)  # running in the worker
    queued = [asyncio.create_task(node.infer(request("a", f"p{i}"))) for i in range(5)]
    await wait_for(lambda: node.models()[0].in_flight == 6, 15, "six requests in flight")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        async for _ in stream:
            pass
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, WorkerCrashed) for o in outcomes), outcomes
    # Six failed requests, one death: the breaker (threshold 4) stays closed.
    assert node.models()[0].breaker == "closed"
    assert (await node.infer(request("a"))).tokens_generated == 8


async def test_unload_leaves_no_worker_process(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (
        await started(
            runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        )
    ).node
    loaded = await node.load(LoadRequest(name="a"))
    assert loaded.pid is not None and pid_alive(loaded.pid)
    info = await node.unload("a")
    assert info.state == "available"
    assert not pid_alive(loaded.pid)
    assert node.devices()[0].claimed_mb == 0


async def test_an_unload_lets_the_requests_in_flight_finish_first(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    node = (
        await started(
            runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
        )
    ).node
    await node.load(LoadRequest(name="a"))
    stream = node.infer_stream(request("a", max_tokens=64))
    assert isinstance(await stream.__anext__(), TokenChunk)  # one request is running
    queued = asyncio.create_task(node.infer(request("a", "another prompt", max_tokens=16)))
    unloading = asyncio.create_task(node.unload("a"))
    rest = [item async for item in stream]
    assert isinstance(rest[-1], InferResult) and rest[-1].tokens_generated == 64
    assert (await queued).tokens_generated == 16
    assert (await unloading).state == "available"


async def test_a_restart_restores_the_loaded_set_and_pins(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a", "b"))
    first = await started(runtime_factory, config)
    await first.node.load(LoadRequest(name="a"))
    await first.node.load(LoadRequest(name="c", path="c.gguf", pin=True))
    await first.close()

    second = await started(runtime_factory, config)
    states = {m.name: (m.state, m.pinned) for m in second.node.models()}
    assert states == {"a": ("loaded", False), "b": ("available", False), "c": ("loaded", True)}
    assert second.node.is_ready()


async def test_three_simulated_devices_fill_up_then_idle_models_are_evicted(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    devices = tuple(SimulatedDevice(f"sim{i}", total_mb=1) for i in range(3))
    # Size the devices to hold one tiny model each, from the node's own estimate.
    probe = await started(
        runtime_factory,
        make_config(tmp_path / "probe", model_root, catalog=catalog_of(model_root, "a")),
    )
    await probe.node.load(LoadRequest(name="a"))
    need = max(probe.node.models()[0].estimate_mb or 0, probe.node.models()[0].memory_mb or 0)
    await probe.close()
    devices = tuple(SimulatedDevice(f"sim{i}", total_mb=int(need * 1.5)) for i in range(3))

    config = make_config(
        tmp_path, model_root, catalog=catalog_of(model_root, "a", "b", "c", "d"), simulated=devices
    )
    node = (await started(runtime_factory, config)).node
    for name in "abc":
        await node.load(LoadRequest(name=name))
    placed = {m.name: m.device for m in node.models() if m.state == "loaded"}
    assert sorted(placed.values()) == ["sim0 (simulated)", "sim1 (simulated)", "sim2 (simulated)"]
    await node.infer(request("b"))
    await node.infer(request("c"))  # "a" is now the longest idle
    await node.load(LoadRequest(name="d"))
    states = {m.name: m.state for m in node.models()}
    assert states == {"a": "available", "b": "loaded", "c": "loaded", "d": "loaded"}
    assert {m.device for m in node.models() if m.name == "d"} == {placed["a"]}


async def test_a_model_that_fits_nowhere_even_after_eviction_is_refused(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    devices = (SimulatedDevice("sim0", total_mb=1),)
    node = (
        await started(
            runtime_factory,
            make_config(
                tmp_path, model_root, catalog=catalog_of(model_root, "a"), simulated=devices
            ),
        )
    ).node
    with pytest.raises(InsufficientMemory, match="needs about"):
        await node.infer(request("a"))
    assert node.devices()[0].claimed_mb == 0


async def test_keep_alive_unloads_an_idle_model(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    config = make_config(
        tmp_path, model_root, catalog=catalog_of(model_root, "a"), keep_alive="100ms"
    )
    node = (await started(runtime_factory, config)).node
    loaded = await node.load(LoadRequest(name="a"))
    await wait_for(lambda: node.models()[0].state == "available", 15, "the model unloaded")
    assert loaded.pid is not None and not pid_alive(loaded.pid)


async def test_a_pinned_model_outlives_keep_alive(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    catalog = catalog_of(model_root, "a", pin=True) + catalog_of(model_root, "b")
    config = make_config(tmp_path, model_root, catalog=catalog, keep_alive="100ms")
    node = (await started(runtime_factory, config)).node
    await node.load(LoadRequest(name="a"))
    await node.load(LoadRequest(name="b"))
    # once the unpinned one has expired, the expiry round has passed over the pinned one too
    await wait_for(
        lambda: {m.name: m.state for m in node.models()}["b"] == "available", 15, "b unloaded"
    )
    assert {m.name: m.state for m in node.models()}["a"] == "loaded"


async def test_a_full_bulkhead_answers_overloaded_at_once(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    config = make_config(
        tmp_path,
        model_root,
        catalog=catalog_of(model_root, "a", n_ctx=4096),
        bulkhead=BulkheadConfig(max_concurrent=1, max_queue_size=0),
    )
    node = (await started(runtime_factory, config)).node
    await node.load(LoadRequest(name="a"))
    stream = node.infer_stream(request("a", max_tokens=2000))
    await stream.__anext__()
    began = time.monotonic()
    with pytest.raises(Overloaded):
        await node.infer(request("a"))
    assert time.monotonic() - began < 1.0
    await stream.aclose()  # the client leaves: generation stops, the slot frees
    result = await node.infer(request("a"))
    assert result.tokens_generated == 8


async def test_draining_refuses_new_requests_and_close_stops_every_worker(
    tmp_path: Path, model_root: Path, runtime_factory: Factory
) -> None:
    runtime = await started(
        runtime_factory, make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a", "b"))
    )
    node = runtime.node
    await node.load(LoadRequest(name="a"))
    await node.load(LoadRequest(name="b"))
    pids = [m.pid for m in node.models()]
    await node.drain(timeout=5)
    assert not node.is_ready()
    with pytest.raises(ShuttingDown):
        await node.infer(request("a"))
    await runtime.close()
    assert all(pid is not None and not pid_alive(pid) for pid in pids)
