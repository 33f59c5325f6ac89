"""Fixtures for Node tests: generated models in a model dir, and a node built on them."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from actors.gguf_synth import write_preset
from actors.serving.config import (
    BulkheadConfig,
    CatalogEntry,
    ModelsConfig,
    ResilienceConfig,
    ResourcesConfig,
    SimulatedDevice,
)
from actors.worker.client import WorkerProcess
from actors.worker.handle import RequestChannel, WorkerFactory, WorkerHandle, WorkerSpec
from actors.worker.protocol import Loaded
from moc_node.app import Runtime, build_runtime
from moc_node.config import Config, NodeConfig


@pytest.fixture(scope="session")
def generated_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with tiny models a.gguf, b.gguf, c.gguf, d.gguf (different seeds)."""
    root = tmp_path_factory.mktemp("generated")
    for seed, name in enumerate("abcd"):
        write_preset(root / f"{name}.gguf", "tiny", seed=seed)
    return root


@pytest.fixture
def model_root(tmp_path: Path, generated_models: Path) -> Path:
    models = tmp_path / "models"
    shutil.copytree(generated_models, models)
    return models


class CountingWorkers:
    """A worker factory that makes real workers and counts how many loads were started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.workers: list[WorkerProcess] = []

    def __call__(self, spec: WorkerSpec, runtime_dir: Path) -> WorkerHandle:
        worker = WorkerProcess(spec, runtime_dir=runtime_dir)
        self.workers.append(worker)
        return _CountedWorker(worker, self.started.append)


class _CountedWorker:
    """A real worker whose starts are counted: a WorkerHandle around it, not a subclass."""

    def __init__(self, worker: WorkerProcess, on_start: Callable[[str], None]) -> None:
        self._worker = worker
        self._on_start = on_start

    @property
    def pid(self) -> int | None:
        return self._worker.pid

    @property
    def alive(self) -> bool:
        return self._worker.alive

    @property
    def peak_memory_mb(self) -> float | None:
        return self._worker.peak_memory_mb

    def start(self, timeout: float = 300.0) -> Loaded:
        self._on_start(self._worker.name)
        return self._worker.start(timeout)

    def open_channel(self) -> RequestChannel:
        return self._worker.open_channel()

    def stop(self, timeout: float = 10.0) -> None:
        self._worker.stop(timeout)

    def kill(self) -> None:
        self._worker.kill()


def make_config(
    tmp_path: Path,
    model_root: Path,
    *,
    catalog: tuple[CatalogEntry, ...] = (),
    keep_alive: str = "5m",
    simulated: tuple[SimulatedDevice, ...] = (),
    bulkhead: BulkheadConfig | None = None,
    max_loaded: int = 0,
) -> Config:
    resources = ResourcesConfig(devices="cpu")
    if simulated:
        resources = ResourcesConfig(
            devices="simulated", simulated=simulated, reserve_mb=0, eviction_threshold_pct=100
        )
    return Config(
        node=NodeConfig(
            name="test-node", state_dir=str(tmp_path / "state"), model_dirs=(str(model_root),)
        ),
        resources=resources,
        models=ModelsConfig(keep_alive=keep_alive, catalog=catalog, max_loaded=max_loaded),
        resilience=ResilienceConfig(bulkhead=bulkhead or BulkheadConfig()),
    )


def catalog_of(model_root: Path, *names: str, **overrides: object) -> tuple[CatalogEntry, ...]:
    return tuple(
        dataclasses.replace(
            CatalogEntry(name=n, path=str(model_root / f"{n}.gguf"), n_ctx=256), **overrides
        )  # type: ignore[arg-type]
        for n in names
    )


@pytest.fixture
def workers() -> CountingWorkers:
    return CountingWorkers()


@pytest.fixture
async def runtime_factory(workers: CountingWorkers) -> AsyncIterator[Callable[[Config], Runtime]]:
    built: list[Runtime] = []

    def build(config: Config, factory: WorkerFactory | None = None) -> Runtime:
        runtime = build_runtime(config, worker_factory=factory or workers)
        built.append(runtime)
        return runtime

    yield build
    for runtime in built:
        if not runtime.node.closed:
            await runtime.close()


__all__ = ["CountingWorkers", "make_config", "catalog_of"]
