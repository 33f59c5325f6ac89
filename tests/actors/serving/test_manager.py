"""The ModelManager over fake workers and a fake clock: loads, placement with eviction,
keep-alive expiry, unloads that drain, a crash restarted behind the breaker, memory growth.

Real actors (the manager and its ModelActors), a real ledger, board and SQLite state file; the
workers are tests/actors/serving/fake_worker.py and time moves only when a test moves it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.bridge import ask, reply_on_loop
from actors.errors import CircuitOpen, InsufficientMemory, ModelLoadFailed, WorkerCrashed
from actors.serving.board import ModelBoard
from actors.serving.config import (
    BulkheadConfig,
    CatalogEntry,
    CircuitBreakerConfig,
    ModelsConfig,
)
from actors.serving.lane import LaneClosed, ModelLane
from actors.serving.ledger import Budget, Ledger
from actors.serving.manager import ManagerDeps, ModelManager
from actors.serving.memory_watch import MemoryWatch
from actors.serving.probes import DeviceReading
from actors.serving.resilience import BulkheadRegistry
from actors.serving.store import StateStore
from actors.types import GenerationParams, InferRequest, LoadRequest, ModelInfo
from tests.actors.serving.fake_worker import FakeWorkers
from tests.support import FakeClock, wait_for

REQ = InferRequest(model="a", prompt="hi", params=GenerationParams(max_tokens=2))
MEASURED_MB = 100.0  # what each fake worker reports at load: the claim (above the estimate)
ROOM_FOR_TWO_MB = 204.0  # two claims of 100 MiB leave less than a tiny model's estimate (~8 MiB)
WALL_S = 1_765_000_000.0  # the wall clock clients see in last_used


class Rig:
    """A started manager over one simulated device and a catalog of models a, b and c."""

    def __init__(
        self,
        tmp_path: Path,
        model: Path,
        *,
        keep_alive: str = "5m",
        pinned: tuple[str, ...] = (),
        total_mb: float = ROOM_FOR_TWO_MB,
        parallel: int = 1,
        cpu_threads: int = 0,
        worker_nice: int = 0,
        huge_pages: bool = True,
    ) -> None:
        self.clock = FakeClock()
        self.workers = FakeWorkers(measured_mb=MEASURED_MB)
        self.ledger = Ledger(
            "cpu", "simulated", Budget(reserve_mb=0, threshold_pct=100), DeviceReading(total_mb, 0)
        )
        self.board = ModelBoard()
        self.bulkheads = BulkheadRegistry(BulkheadConfig())
        self.abort = threading.Event()
        catalog = tuple(CatalogEntry(n, str(model), pin=n in pinned) for n in ("a", "b", "c"))
        self.ref = ModelManager.start(
            ManagerDeps(
                models=ModelsConfig(keep_alive=keep_alive, catalog=catalog, parallel=parallel),
                ledgers={"cpu": self.ledger},
                device_index={"cpu": None},
                model_dirs=[model.parent],
                store=StateStore(tmp_path / "state.db"),
                bulkheads=self.bulkheads,
                breaker=CircuitBreakerConfig(failure_threshold=1, reset_timeout=10.0),
                runtime_dir=tmp_path,
                board=self.board,
                abort=self.abort,
                clock=self.clock,
                wall_clock=lambda: WALL_S,
                worker_factory=self.workers,
                memory_watch=MemoryWatch(poll_s=3600.0),  # no measuring between requests
                cpu_threads=cpu_threads,
                worker_nice=worker_nice,
                huge_pages=huge_pages,
            )
        )
        self.manager = self.ref.proxy()

    async def acquire(self, name: str) -> ModelLane:
        answer, reply = reply_on_loop(asyncio.get_running_loop())
        self.manager.acquire(LoadRequest(name=name), reply)
        lane: ModelLane = await asyncio.wait_for(answer, 5)
        return lane

    async def unload(self, name: str) -> ModelInfo:
        answer, reply = reply_on_loop(asyncio.get_running_loop())
        self.manager.unload(name, reply)
        info: ModelInfo = await asyncio.wait_for(answer, 5)
        return info

    def state(self, name: str) -> str | None:
        info = self.board.get(name)
        return None if info is None else info.state

    def states(self) -> dict[str, str | None]:
        return {name: self.state(name) for name in ("a", "b", "c")}

    def stop(self) -> None:
        self.workers.release()
        self.abort.set()  # unloads at teardown do not wait for requests
        self.manager.close().get(timeout=5)
        self.board.wait_until(
            lambda models: all(m.state not in ("loading", "unloading") for m in models), 5
        )
        self.ref.stop(timeout=5)


@pytest.fixture
def rigs(tmp_path: Path, tiny_gguf: Path) -> Iterator[list[Rig]]:
    started: list[Rig] = []
    yield started
    for rig in started:
        rig.stop()


Make = Callable[..., Rig]


@pytest.fixture
def make(rigs: list[Rig], tmp_path: Path, tiny_gguf: Path) -> Make:
    def start(**options: Any) -> Rig:
        rig = Rig(tmp_path, tiny_gguf, **options)
        rigs.append(rig)
        return rig

    return start


async def test_a_cold_model_is_loaded_on_first_acquire_and_served_through_its_lane(
    make: Make,
) -> None:
    rig = make()
    lane = await rig.acquire("a")
    assert (await lane.infer(REQ)).text == "ok"
    info = rig.board.get("a")
    assert info is not None and info.state == "loaded" and info.version == "a-v1"
    assert info.last_used == WALL_S
    assert rig.board.lane("a") is lane
    assert rig.ledger.claims() == {"a": MEASURED_MB}  # the measurement: above the estimate
    assert await rig.acquire("a") is lane and len(rig.workers.made) == 1  # loaded once


async def test_the_node_default_parallel_reaches_the_worker_of_a_gguf_model(make: Make) -> None:
    rig = make(parallel=4, total_mb=10_000.0)
    await rig.acquire("a")
    (worker,) = rig.workers.of("a")
    assert worker.spec.load.parallel == 4


async def test_the_workers_run_at_the_configured_nice(make: Make) -> None:
    rig = make(worker_nice=7, total_mb=10_000.0)
    await rig.acquire("a")
    (worker,) = rig.workers.of("a")
    assert worker.spec.load.nice == 7


@pytest.mark.parametrize("huge_pages", [True, False])
async def test_the_workers_ask_for_huge_pages_as_configured(make: Make, huge_pages: bool) -> None:
    rig = make(huge_pages=huge_pages, total_mb=10_000.0)
    await rig.acquire("a")
    (worker,) = rig.workers.of("a")
    assert worker.spec.huge_pages is huge_pages


async def test_models_on_the_cpu_share_its_threads_as_they_come_and_go(make: Make) -> None:
    rig = make(cpu_threads=6, total_mb=10_000.0)
    await rig.acquire("a")
    (worker_a,) = rig.workers.of("a")
    assert worker_a.spec.load.n_threads == 6  # alone, it has them all
    await rig.acquire("b")
    (worker_b,) = rig.workers.of("b")
    assert worker_b.spec.load.n_threads == 3
    await wait_for(lambda: worker_a.threads == [3], 5, "a told to make room")
    await rig.unload("b")
    await wait_for(lambda: worker_a.threads == [3, 6], 5, "a given the threads back")


async def test_a_model_that_does_not_fit_evicts_the_idle_model_longest_unused(make: Make) -> None:
    rig = make()
    lane_a = await rig.acquire("a")
    rig.clock.advance(100)
    await rig.acquire("b")
    rig.clock.advance(10)
    await lane_a.infer(REQ)  # a was used just now: b, idle for 10 s, is cheaper to lose
    await rig.acquire("c")
    assert rig.states() == {"a": "loaded", "b": "available", "c": "loaded"}
    assert rig.workers.of("b")[0].stopped
    assert set(rig.ledger.claims()) == {"a", "c"}


async def test_a_model_with_requests_is_not_evicted_so_a_load_that_needs_its_room_is_refused(
    make: Make,
) -> None:
    rig = make(total_mb=104.0)  # room for one model (a claim of 100 MiB, an estimate of ~8)
    await rig.acquire("a")
    async with rig.bulkheads.get("a").slot():  # a request admitted to a
        with pytest.raises(InsufficientMemory, match="no device has room"):
            await rig.acquire("b")
        assert rig.states() == {"a": "loaded", "b": "available", "c": "available"}
    await rig.acquire("b")  # a is idle again: it makes room
    assert rig.states() == {"a": "available", "b": "loaded", "c": "available"}


async def test_an_idle_model_expires_at_keep_alive_and_a_pinned_one_never(make: Make) -> None:
    rig = make(keep_alive="5m", pinned=("b",))
    await rig.acquire("a")
    await rig.acquire("b")
    rig.clock.advance(299)
    await ask(rig.manager.expire_idle())
    assert rig.states() == {"a": "loaded", "b": "loaded", "c": "available"}
    rig.clock.advance(1)
    await ask(rig.manager.expire_idle())
    await wait_for(lambda: rig.state("a") == "available", 5, "a to expire")
    assert rig.state("b") == "loaded" and rig.workers.of("a")[0].stopped


async def test_with_keep_alive_zero_a_model_is_unloaded_as_soon_as_its_request_ends(
    make: Make,
) -> None:
    rig = make(keep_alive="0")
    lane = await rig.acquire("a")
    await lane.infer(REQ)
    await wait_for(lambda: rig.state("a") == "available", 5, "a to be unloaded")


async def test_an_unload_waits_for_the_running_request_and_refuses_new_ones(make: Make) -> None:
    rig = make()
    lane = await rig.acquire("a")
    rig.workers.hold.set()
    running = asyncio.ensure_future(lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    unloaded = asyncio.ensure_future(rig.unload("a"))
    await wait_for(lambda: lane.closing, 5, "the lane to close")
    assert rig.state("a") == "unloading" and not unloaded.done()
    with pytest.raises(LaneClosed):
        await lane.infer(REQ)
    rig.workers.release()
    assert (await running).text == "ok"  # drained, not cut off
    info = await unloaded
    assert info.state == "available" and rig.ledger.claims() == {}
    assert rig.workers.of("a")[0].stopped


async def test_a_crashed_worker_is_restarted_behind_the_breaker(make: Make) -> None:
    rig = make()
    lane = await rig.acquire("a")
    rig.workers.hold.set()
    running = asyncio.ensure_future(lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    first = rig.workers.of("a")[0]
    first.crash()
    with pytest.raises(WorkerCrashed, match="signal 11"):
        await running
    rig.workers.release()
    await wait_for(lambda: len(rig.workers.of("a")) == 2, 5, "a fresh worker")
    with pytest.raises(CircuitOpen):  # the breaker opened at the crash (threshold 1)
        await lane.infer(REQ)
    rig.clock.advance(10)  # its reset: one trial goes through, to the fresh worker
    assert (await lane.infer(REQ)).text == "ok"
    second = rig.workers.of("a")[1]
    assert second.served == 1 and first.served == 0
    await wait_for(lambda: getattr(rig.board.get("a"), "pid", None) == second.pid, 5, "new pid")


async def test_a_model_whose_worker_grew_claims_its_new_size(make: Make) -> None:
    rig = make()
    lane = await rig.acquire("a")
    rig.workers.peak_after_request = 180.0
    await lane.infer(REQ)
    await wait_for(lambda: rig.ledger.claims() == {"a": 180.0}, 5, "the claim to grow")
    info = rig.board.get("a")
    assert info is not None and info.memory_mb == 180.0


async def test_a_load_that_fails_leaves_the_model_failed_naming_why_and_claims_nothing(
    make: Make,
) -> None:
    rig = make()
    rig.workers.failing.add("a")
    with pytest.raises(ModelLoadFailed, match="will not load"):
        await rig.acquire("a")
    # Its claim goes once its actor has stopped (a message later than the failure).
    await wait_for(lambda: rig.ledger.claims() == {}, 5, "the claim to be released")
    info = rig.board.get("a")
    assert info is not None and info.state == "failed"
    assert info.error is not None and "will not load" in info.error


async def test_a_model_asked_for_while_it_unloads_is_loaded_again_once_it_stopped(
    make: Make,
) -> None:
    rig = make()
    lane = await rig.acquire("a")
    rig.workers.hold.set()
    running = asyncio.ensure_future(lane.infer(REQ))
    await wait_for(lambda: len(rig.workers.waiting) == 1, 5, "the request at the worker")
    unloaded = asyncio.ensure_future(rig.unload("a"))
    await wait_for(lambda: rig.state("a") == "unloading", 5, "a to be unloading")
    again = asyncio.ensure_future(rig.acquire("a"))
    rig.workers.release()
    await running
    assert (await unloaded).state == "available"
    fresh = await again
    assert fresh is not lane and rig.state("a") == "loaded"
    assert [w.stopped for w in rig.workers.of("a")] == [True, False]
