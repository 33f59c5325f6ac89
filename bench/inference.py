"""Inference through the Node versus llama-cpp-python directly, on generated models.

Measures in one run: decode tokens/s through `Node.infer_stream` vs a direct `llama_cpp.Llama`
in this process (goal >= 0.95x) and vs llama.cpp's own `llama-batched-bench` at 1 sequence with
its own defaults (threads included: llama-cpp-python's default of half the CPUs hides that
handicap from the first ratio; bench/llama_tools.py builds it), time to first token (node - direct), cold load through the node
vs a direct `Llama()` (goal <= 1.2x plus process start), and the memory estimate vs measured for
three model sizes. Prints a table; `--json` adds one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.gguf_synth import SIZES, write_preset
from actors.serving.config import CatalogEntry, ModelsConfig, ResourcesConfig
from actors.types import GenerationParams, InferRequest, LoadRequest, TokenChunk
from moc_node.app import build_runtime
from moc_node.config import Config, NodeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_tools  # noqa: E402
from batching import batched_bench  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
N_CTX = 512


def direct_llama(path: Path, tokens: int, runs: int) -> dict[str, float]:
    """Load with llama-cpp-python here and decode greedily, as the worker does."""
    import llama_cpp

    began = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=N_CTX, n_gpu_layers=0, seed=0, use_mmap=False, verbose=False
    )
    load_s = time.perf_counter() - began
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    ttfts, rates = [], []
    for _ in range(runs):
        # No reset: like the worker, llama-cpp-python reuses the KV cache of a shared prefix.
        start = time.perf_counter()
        stamps: list[float] = []
        for _token in llm.generate(prompt, top_k=40, top_p=0.9, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            llm.detokenize([_token])
            if len(stamps) >= tokens:
                break
        ttfts.append(stamps[0] - start)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    del llm
    gc.collect()
    return {"load_s": load_s, "ttft_s": statistics.median(ttfts), "tok_s": statistics.median(rates)}


async def through_node(path: Path, state: Path, tokens: int, runs: int) -> dict[str, float]:
    """Load and decode the same model through a Node with a real worker process."""
    config = Config(
        node=NodeConfig(name="bench", state_dir=str(state), model_dirs=(str(path.parent),)),
        resources=ResourcesConfig(devices="cpu"),
        models=ModelsConfig(catalog=(CatalogEntry(name="m", path=str(path), n_ctx=N_CTX),)),
    )
    runtime = build_runtime(config)
    try:
        await runtime.node.start()
        began = time.perf_counter()
        await runtime.node.load(LoadRequest(name="m"))
        load_s = time.perf_counter() - began
        params = GenerationParams(max_tokens=tokens, temperature=0.0, seed=0)
        ttfts, rates = [], []
        for _ in range(runs):
            start = time.perf_counter()
            stamps: list[float] = []
            async for item in runtime.node.infer_stream(
                InferRequest("m", prompt=PROMPT, params=params)
            ):
                if isinstance(item, TokenChunk):
                    stamps.append(time.perf_counter())
            ttfts.append(stamps[0] - start)
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        return {
            "load_s": load_s,
            "ttft_s": statistics.median(ttfts),
            "tok_s": statistics.median(rates),
        }
    finally:
        await runtime.close()


async def estimates(models: dict[str, Path], state: Path) -> dict[str, tuple[float, float]]:
    """Return (estimate, measured) MiB per size, loading each through the node."""
    catalog = tuple(CatalogEntry(name=n, path=str(p), n_ctx=N_CTX) for n, p in models.items())
    config = Config(
        node=NodeConfig(
            name="bench",
            state_dir=str(state),
            model_dirs=(str(next(iter(models.values())).parent),),
        ),
        resources=ResourcesConfig(devices="cpu"),
        models=ModelsConfig(catalog=catalog),
    )
    runtime = build_runtime(config)
    out = {}
    try:
        await runtime.node.start()
        for name in models:
            await runtime.node.load(LoadRequest(name=name))
            # The working size: a prompt that fills the context touches every buffer, as the
            # estimate assumes; the worker reports its memory after each request.
            filling = InferRequest(name, prompt="x" * (N_CTX - 16), params=FILL)  # 1 byte, 1 token
            await runtime.node.infer(filling)
            info = await _settled(runtime, name)
            out[name] = (info.estimate_mb or 0.0, info.memory_mb or 0.0)
            await runtime.node.unload(name)
    finally:
        await runtime.close()
    return out


FILL = GenerationParams(max_tokens=4, temperature=0.0)


async def _settled(runtime: Any, name: str) -> Any:
    """Return the model's info once the post-request memory report has reached the board."""
    before = runtime.node.model_info(name)
    for _ in range(40):  # the report travels actor -> manager -> board: a few ms
        await asyncio.sleep(0.05)
        info = runtime.node.model_info(name)
        if info.memory_mb != before.memory_mb:
            return info
    return runtime.node.model_info(name)


def process_start_s() -> float:
    """Time to start a Python process that imports llama_cpp (the worker's fixed cost)."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import llama_cpp, zmq, msgpack"], check=True)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer tokens and runs (< 2 min)")
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    args = parser.parse_args()
    tokens, runs = (64, 2) if args.quick else (256, 5)
    with tempfile.TemporaryDirectory(prefix="moc-bench-") as tmp:
        root = Path(tmp) / "models"
        root.mkdir()
        models = {
            size: write_preset(root / f"{size}.gguf", size)
            for size in ("tiny", "small", "medium50m")
        }
        big = models["medium50m"]
        direct = direct_llama(big, tokens, runs)
        node = asyncio.run(through_node(big, Path(tmp) / "state1", tokens, runs))
        memory = asyncio.run(estimates(models, Path(tmp) / "state2"))
        start_s = process_start_s()
        tool = llama_tools.build(llama_tools.installed_version())["llama-batched-bench"]
        prompt_tokens = len(PROMPT.encode()) + 1  # byte vocabulary, plus BOS
        anchor_tok_s = batched_bench(tool, big, (1,), tokens, prompt_tokens, N_CTX)[1]

    decode_ratio = node["tok_s"] / direct["tok_s"]
    llama_cpp_ratio = node["tok_s"] / anchor_tok_s
    ttft_overhead_ms = (node["ttft_s"] - direct["ttft_s"]) * 1000
    load_ratio = node["load_s"] / direct["load_s"]
    load_ratio_less_start = (node["load_s"] - start_s) / direct["load_s"]
    errors = {n: abs(e - m) / m * 100 for n, (e, m) in memory.items() if m > 0}
    params = SIZES["medium50m"].n_params()

    print(
        f"model: generated llama, {params / 1e6:.1f}M params, f32, n_ctx {N_CTX}, CPU, {tokens} tokens x {runs} runs"
    )
    print(f"{'measure':32} {'direct':>10} {'node':>10} {'ratio':>8}")
    print(
        f"{'decode tokens/s':32} {direct['tok_s']:10.1f} {node['tok_s']:10.1f} {decode_ratio:8.3f}"
    )
    print(
        f"{'  vs llama-batched-bench, 1 seq':32} {anchor_tok_s:10.1f} {node['tok_s']:10.1f} {llama_cpp_ratio:8.3f}"
    )
    print(
        f"{'time to first token (ms)':32} {direct['ttft_s'] * 1000:10.1f} {node['ttft_s'] * 1000:10.1f} {'+' + format(ttft_overhead_ms, '.1f'):>8}"
    )
    print(f"{'cold load (s)':32} {direct['load_s']:10.3f} {node['load_s']:10.3f} {load_ratio:8.2f}")
    print(
        f"{'  less process start (s)':32} {'':10} {node['load_s'] - start_s:10.3f} {load_ratio_less_start:8.2f}"
    )
    print(f"{'process start (s)':32} {'':10} {start_s:10.3f}")
    print(f"\n{'size':12} {'estimate MiB':>14} {'measured MiB':>14} {'error %':>8}")
    for name, (est, meas) in memory.items():
        print(f"{name:12} {est:14.1f} {meas:14.1f} {errors.get(name, float('nan')):8.1f}")
    figures: dict[str, Any] = {
        "decode_ratio": round(decode_ratio, 3),
        "decode_ratio_vs_llama_cpp": round(llama_cpp_ratio, 3),
        "llama_cpp_decode_tok_s": round(anchor_tok_s, 1),
        "node_decode_tok_s": round(node["tok_s"], 1),
        "ttft_overhead_ms": round(ttft_overhead_ms, 2),
        "load_ratio": round(load_ratio, 3),
        "load_ratio_less_process_start": round(load_ratio_less_start, 3),
        "process_start_s": round(start_s, 3),
        "estimate_error_pct": round(max(errors.values()), 2),
    }
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
