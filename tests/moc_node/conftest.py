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
from actors.serving.model import WorkerFactory, _default_worker
from actors.worker.client import WorkerProcess, WorkerSpec
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

    def __call__(self, spec: WorkerSpec, runtime_dir: Path) -> WorkerProcess:
        worker = _CountingWorker(spec, runtime_dir=runtime_dir, on_start=self.started.append)
        self.workers.append(worker)
        return worker


class _CountingWorker(WorkerProcess):
    def __init__(self, spec: WorkerSpec, *, runtime_dir: Path, on_start: Callable[[str], None]):
        super().__init__(spec, runtime_dir=runtime_dir)
        self._on_start = on_start

    def start(self, timeout: float = 300.0):  # type: ignore[no-untyped-def]
        self._on_start(self.spec.name)
        return super().start(timeout)


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


__all__ = ["CountingWorkers", "make_config", "catalog_of", "_default_worker"]
