"""The ModelActor measures its real worker while a request runs: growth is reported, a worker
past the per-worker memory limit is killed, its request fails naming the limit, the breaker
opens and a fresh worker takes over.

The growth is real: a tiny model with a 16384-token context reserves its buffers at load, and a
prompt of ~12,000 tokens touches them as its chunks are decoded (~+9.6 MiB of RSS measured: with
the flash attention llama.cpp chooses, the attention mask of each chunk grows with the cells in
use; there is no score matrix).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from actors.errors import WorkerCrashed
from actors.gguf_synth import SIZES, write_llama_gguf
from actors.serving.config import CircuitBreakerConfig
from actors.serving.lane import ModelLane
from actors.serving.memory_watch import MemoryWatch
from actors.serving.model import ModelActor
from actors.serving.probes import process_rss_mb
from actors.serving.resilience import CircuitBreaker
from actors.types import GenerationParams, InferRequest
from actors.worker.client import WorkerProcess
from actors.worker.handle import WorkerSpec
from actors.worker.protocol import Loaded, LoadSpec
from tests.support import wait_until

N_CTX = 16384
GROWTH_MB = 5.0
"""Less than the long prompt's growth, more than a load's or a short request's noise."""
LONG = InferRequest(model="tiny", prompt="ab" * 6000, params=GenerationParams(max_tokens=1))
SHORT = InferRequest(model="tiny", prompt="hi", params=GenerationParams(max_tokens=2))


class Events:
    """Records what the actor and the lane tell the manager, with the reporting thread."""

    def __init__(self) -> None:
        self.loaded: list[Loaded] = []
        self.memory: list[tuple[float, str]] = []

    def model_loaded(self, name: str, info: Loaded) -> None:
        self.loaded.append(info)

    def model_load_failed(self, name: str, error: Exception) -> None:
        raise AssertionError(f"the load failed: {error}")

    def model_stopped(self, name: str) -> None:
        pass

    def model_used(self, name: str) -> None:
        pass

    def model_memory(self, name: str, mb: float) -> None:
        self.memory.append((mb, threading.current_thread().name))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = SIZES["tiny"]
    return write_llama_gguf(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layer=s.n_layer,
                            n_embd=s.n_embd, n_head=s.n_head, n_head_kv=s.n_head_kv, n_ff=s.n_ff,
                            n_ctx_train=N_CTX)  # fmt: skip


def spec(model: Path) -> WorkerSpec:
    return WorkerSpec(name="tiny", load=LoadSpec(backend="gguf", path=str(model), n_ctx=N_CTX))


class Supervised:
    """A real ModelActor over a real worker, with its lane and breaker."""

    def __init__(self, model: Path, runtime: Path, watch: MemoryWatch) -> None:
        self.events = Events()
        self.breaker = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1, reset_timeout=0.2))
        self.lane = ModelLane("tiny", events=self.events, breaker=self.breaker)
        self.ref = ModelActor.start(
            spec(model),
            runtime_dir=runtime,
            events=self.events,
            lane=self.lane,
            breaker=self.breaker,
            memory_watch=watch,
        )
        self.ref.proxy().load().get(timeout=60)
        assert len(self.events.loaded) == 1

    @property
    def worker(self) -> Any:
        return self.ref.proxy().worker.get(timeout=10)


@pytest.fixture
def supervise(tmp_path: Path, model: Path) -> Iterator[Any]:
    started: list[Supervised] = []

    def start(watch: MemoryWatch) -> Supervised:
        started.append(Supervised(model, tmp_path, watch))
        return started[-1]

    yield start
    for s in started:
        s.ref.stop(timeout=30)




async def test_a_worker_that_grows_during_a_request_is_reported_before_the_request_ends(
    supervise: Any,
) -> None:
    s = supervise(MemoryWatch(poll_s=0.05))
    at_load = s.events.loaded[0].measured_mb
    await s.lane.infer(LONG)
    from_the_watch = [mb for mb, thread in s.events.memory if thread.startswith("ModelActor")]
    # Reported by the actor's own measurement, on its thread, while the prompt was processed
    # (the lane reports only once a request is done, from the event loop).
    assert from_the_watch and max(from_the_watch) > at_load + GROWTH_MB, (at_load, s.events.memory)
    assert from_the_watch == sorted(from_the_watch)  # each report a growth over the last


def _loaded_rss(model: Path, runtime: Path) -> float:
    """The worker process's RSS right after loading the model (a plain worker of the same spec)."""
    worker = WorkerProcess(spec(model), runtime_dir=runtime)
    info = worker.start(timeout=60)
    try:
        rss = process_rss_mb(info.pid)
        assert rss is not None
        return rss
    finally:
        worker.stop()


def kills() -> float:
    return REGISTRY.get_sample_value("moc_worker_memory_kills_total", {"model": "tiny"}) or 0.0


async def test_a_worker_past_the_memory_limit_is_killed_its_request_fails_saying_so_and_a_new_one_serves(
    supervise: Any, model: Path, tmp_path: Path
) -> None:
    limit = _loaded_rss(model, tmp_path) + GROWTH_MB  # the long prompt grows it past; a load not
    s = supervise(MemoryWatch(poll_s=0.05, limit_mb=limit))
    first = s.worker.pid
    before = kills()
    with pytest.raises(WorkerCrashed) as failed:
        await s.lane.infer(LONG)
    assert "per-worker memory limit" in str(failed.value)
    assert "worker_memory_limit_mb" in str(failed.value)
    assert kills() == before + 1
    assert s.breaker.state(time.monotonic()) == "open"  # the crash counts as a failure
    # The lane asked the actor for a fresh worker; once the breaker lets a trial through, the
    # model serves again.
    wait_until(lambda: s.worker.alive and s.worker.pid != first, 30, "a fresh worker")
    wait_until(lambda: s.breaker.state(time.monotonic()) != "open", 5, "the breaker's reset")
    assert (await s.lane.infer(SHORT)).tokens_generated == 2
    assert len(s.events.loaded) == 2
