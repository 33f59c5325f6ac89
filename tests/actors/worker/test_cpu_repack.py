"""llama.cpp's CPU weight repacking is off unless asked for: quantized models load and decode in
real workers without it, and the config key reaches the worker through the node.

Repacking ("extra buffer types") puts q8_0/q4_0 weights in llama.cpp's AMX buffer on Xeons with
AMX, whose matmul crashes (SIGSEGV) on the first decode: on such a host the generation tests
here kill their worker without the fix. On other x86 CPUs with AVX2 the repacked buffer is
CPU_REPACK (q4_0 only), which is what the placement tests observe, in the worker's own load log.
Nothing here decodes with repacking on, so the suite stays green on AMX hosts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.gguf_synth import write_preset
from actors.serving.config import CatalogEntry, ModelsConfig
from actors.types import GenerationParams, InferRequest, LoadRequest
from actors.worker.client import WorkerProcess
from actors.worker.native_crash import describe_cpu
from moc_node.app import build_runtime
from moc_node.config import build
from tests.actors.worker.workers import run_request, worker_for
from tests.moc_node.conftest import CountingWorkers, make_config

PROMPT = "The quick brown fox"
# llama.cpp repacks q4_0 on x86 with AVX2 and on Arm with NEON dot products (ggml-cpu/repack.cpp),
# and everything quantized into AMX tiles where AMX is.
REPACKS_Q4_0 = any(flag in describe_cpu().split() for flag in ("avx2", "asimddp", "amx_int8"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The "small" preset (4 layers, 256 wide: every matrix repackable) as q8_0 and q4_0."""
    root = tmp_path_factory.mktemp("quantized")
    return {
        q: write_preset(root / f"small-{q}.gguf", "small", seed=3, dtype=q)
        for q in ("q8_0", "q4_0")
    }  # type: ignore[arg-type]


@pytest.fixture
def started() -> Iterator[list[WorkerProcess]]:
    workers: list[WorkerProcess] = []
    yield workers
    for worker in workers:
        worker.stop()


def start(
    path: Path, runtime_dir: Path, workers: list[WorkerProcess], **kw: object
) -> WorkerProcess:
    worker = worker_for(path, runtime_dir, path.stem, n_ctx=256, n_threads=1, **kw)
    workers.append(worker)
    worker.start(timeout=60)
    return worker


def weights_line(worker: WorkerProcess) -> str:
    """The worker's report of where llama.cpp put the weights (its log is kept while it runs)."""
    assert worker.log_path is not None
    lines = [ln for ln in worker.log_path.read_text().splitlines() if "weights in" in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_a_quantized_model_loads_and_generates_in_a_real_worker(
    quant: str, quantized: dict[str, Path], runtime_dir: Path, started: list[WorkerProcess]
) -> None:
    worker = start(quantized[quant], runtime_dir, started)
    params = GenerationParams(max_tokens=24, temperature=0.0, top_p=1.0)
    for _ in range(2):  # the first decode is where llama.cpp's AMX matmul crashed
        result = run_request(worker, InferRequest(model=quant, prompt=PROMPT, params=params))
        assert result.tokens_generated == 24
        assert result.text.isascii() and result.text.isprintable()
    assert worker.alive


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_by_default_a_worker_keeps_the_weights_in_plain_cpu_buffers(
    quant: str, quantized: dict[str, Path], runtime_dir: Path, started: list[WorkerProcess]
) -> None:
    line = weights_line(start(quantized[quant], runtime_dir, started))
    assert "weights in CPU " in line and "(cpu_repack off," in line
    assert "REPACK" not in line and "AMX" not in line


@pytest.mark.skipif(not REPACKS_Q4_0, reason="llama.cpp repacks nothing on this CPU")
def test_with_cpu_repack_on_llama_cpp_repacks_the_q4_0_weights(
    quantized: dict[str, Path], runtime_dir: Path, started: list[WorkerProcess]
) -> None:
    # Load only: on a Xeon with AMX a decode would crash the worker, which is the point of the
    # default.
    line = weights_line(start(quantized["q4_0"], runtime_dir, started, cpu_repack=True))
    assert "(cpu_repack on," in line
    assert "CPU_REPACK" in line or "AMX" in line


@pytest.mark.parametrize(
    ("node", "entry", "expected"),
    [(False, None, False), (True, None, True), (False, True, True), (True, False, False)],
    ids=["node-off", "node-on", "entry-turns-it-on", "entry-turns-it-off"],
)
def test_a_catalog_entry_overrides_the_node_setting(
    node: bool, entry: bool | None, expected: bool
) -> None:
    model = CatalogEntry(name="m", path="/m.gguf", cpu_repack=entry)
    assert ModelsConfig(cpu_repack=node, catalog=(model,)).cpu_repack_for(model) is expected


def test_the_keys_read_from_toml_with_repacking_off_by_default() -> None:
    text = """
        cpu_repack = true
        [[catalog]]
        name = "plain"
        path = "/m/plain.gguf"
        [[catalog]]
        name = "safe"
        path = "/m/safe.gguf"
        cpu_repack = false
    """
    config: ModelsConfig = build(ModelsConfig, tomllib.loads(text), "models")
    plain, safe = config.catalog
    assert (config.cpu_repack_for(plain), config.cpu_repack_for(safe)) == (True, False)
    assert ModelsConfig().cpu_repack is False


async def test_the_node_passes_each_models_setting_to_its_worker(
    tmp_path: Path, quantized: dict[str, Path]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("plain", "fast"):
        (models / f"{name}.gguf").write_bytes(quantized["q4_0"].read_bytes())
    catalog = (
        CatalogEntry(name="plain", path=str(models / "plain.gguf"), n_ctx=256),
        CatalogEntry(name="fast", path=str(models / "fast.gguf"), n_ctx=256, cpu_repack=True),
    )
    workers = CountingWorkers()
    runtime = build_runtime(make_config(tmp_path, models, catalog=catalog), worker_factory=workers)
    try:
        await runtime.node.start()
        for name in ("plain", "fast"):
            await runtime.node.load(LoadRequest(name=name))
        by_name = {w.spec.name: w for w in workers.workers}
        plain, fast = by_name["plain"].spec.load, by_name["fast"].spec.load
        assert (plain.cpu_repack, fast.cpu_repack) == (False, True)
        assert "(cpu_repack off," in weights_line(by_name["plain"])
        assert "(cpu_repack on," in weights_line(by_name["fast"])
    finally:
        await runtime.close()
