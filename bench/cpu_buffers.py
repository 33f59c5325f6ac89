"""What llama.cpp's CPU weight repacking buys on this CPU: q4_0 and q8_0, repacking on vs off.

`[models] cpu_repack` is off by default, because llama.cpp's AMX buffer type crashes on Xeons
with AMX. This measures the price of that default where repacking works: the same generated
model (the ~51M-parameter "medium50m" preset, so that the matrix products and not the per-token
overhead dominate), loaded through the GGUF backend with `cpu_repack` off and on, the same
threads, decoded greedily in alternating runs of the same process. It reports decode tokens/s
(first token to last), prompt tokens/s (a prompt of ~130 tokens, time to first token), the
ratio on/off of each, and where llama.cpp put the weights (CPU, CPU_REPACK, AMX).

Each figure is the best of its runs (the median is in the JSON too): on a shared machine other
work only ever slows a run down, so the fastest run is the nearest to the CPU's own speed. Where
llama.cpp repacks nothing for a type (q8_0 on x86 without AMX) both loads are the same, and that
row's ratio shows the noise of the measurement.

    python bench/cpu_buffers.py --quick [--json] [--threads N]

On a CPU with AMX it stops at once (repacking on would crash there) unless given --force.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from actors.gguf_synth import SIZES, write_preset
from actors.types import GenerationParams
from actors.worker.backends.gguf import describe_buffers
from actors.worker.backends.gguf_engine import Finish, GgufEngine
from actors.worker.native_crash import describe_cpu
from actors.worker.protocol import LoadSpec

QUANTS = ("q4_0", "q8_0")
BODY = "The quick brown fox jumps over the lazy dog, and then it runs on. " * 2  # ~130 bytes
N_CTX = 1024


def measure(model: GgufEngine, prompt: str, tokens: int) -> tuple[float, float, int]:
    """Decode `tokens` greedily; return (decode tokens/s, prompt tokens/s, prompt tokens)."""
    stamps: list[float] = []
    finished: list[Finish] = []
    start = time.perf_counter()
    model.submit(
        prompt,
        GenerationParams(max_tokens=tokens, temperature=0.0, top_p=1.0),
        emit=lambda _text: stamps.append(time.perf_counter()),
        done=finished.append,
    )
    while model.has_work():
        model.step()
    out = finished[0]
    if out.tokens_generated != tokens or len(stamps) != tokens:
        raise RuntimeError(f"expected {tokens} tokens, got {out.tokens_generated}")
    decode = (tokens - 1) / (stamps[-1] - stamps[0])
    prefill = out.prompt_tokens / (stamps[0] - start)
    return decode, prefill, out.prompt_tokens


def bench_quant(path: Path, threads: int, tokens: int, runs: int) -> dict[str, Any]:
    """Load `path` with repacking off and on; alternate runs; return medians and ratios."""
    models = {
        repack: GgufEngine.load(
            LoadSpec(backend="gguf", path=str(path), n_ctx=N_CTX, n_threads=threads, cpu_repack=repack),
            parallel=1,
        )
        for repack in (False, True)
    }
    try:
        decode: dict[bool, list[float]] = {False: [], True: []}
        prefill: dict[bool, list[float]] = {False: [], True: []}
        prompt_tokens = 0
        for run in range(runs + 1):  # run 0 warms caches and is not counted
            for repack in (False, True) if run % 2 else (True, False):
                # A new first letter each time: the engine would reuse a cached prefix.
                prompt = chr(ord("A") + (2 * run + repack) % 26) + BODY
                d, p, prompt_tokens = measure(models[repack], prompt, tokens)
                if run:
                    decode[repack].append(d)
                    prefill[repack].append(p)
        off_d, on_d = max(decode[False]), max(decode[True])
        off_p, on_p = max(prefill[False]), max(prefill[True])
        return {
            "decode_tok_s_off_median": round(statistics.median(decode[False]), 1),
            "decode_tok_s_on_median": round(statistics.median(decode[True]), 1),
            "decode_tok_s_off": round(off_d, 1),
            "decode_tok_s_on": round(on_d, 1),
            "decode_ratio_on_off": round(on_d / off_d, 3),
            "prompt_tok_s_off": round(off_p, 1),
            "prompt_tok_s_on": round(on_p, 1),
            "prompt_ratio_on_off": round(on_p / off_p, 3),
            "prompt_tokens": prompt_tokens,
            "buffers_off": models[False].weight_buffers,
            "buffers_on": models[True].weight_buffers,
        }
    finally:
        for model in models.values():
            model.close()


def main(argv: list[str] | None = None) -> int:
    """Generate the models, measure each quantization, print a table (and JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 tokens x 7 runs (~1 min)")
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium50m")
    parser.add_argument("--force", action="store_true", help="run on a CPU with AMX anyway")
    args = parser.parse_args(argv)
    if "amx_int8" in describe_cpu().split() and not args.force:
        print(
            "this CPU has AMX: with repacking on, llama.cpp puts the weights in its AMX buffer, "
            "whose matmul crashes (SIGSEGV); pass --force to measure anyway",
            file=sys.stderr,
        )
        return 2
    tokens, runs = (64, 7) if args.quick else (256, 15)
    result: dict[str, Any] = {
        "cpu": describe_cpu(),
        "model": f"{args.size} ({SIZES[args.size].n_params():,} parameters)",
        "threads": args.threads,
        "tokens": tokens,
        "runs": runs,
    }
    with tempfile.TemporaryDirectory(prefix="moc-bench-") as tmp:
        for quant in QUANTS:
            path = write_preset(Path(tmp) / f"{quant}.gguf", args.size, seed=5, dtype=quant)  # type: ignore[arg-type]
            result[quant] = bench_quant(path, args.threads, tokens, runs)
    print(f"cpu: {result['cpu']}")
    print(f"model: {result['model']}, {args.threads} thread(s), {tokens} tokens, best of {runs}")
    print(f"{'':6} {'decode tok/s off':>17} {'on':>8} {'on/off':>7}   {'prompt tok/s off':>17} {'on':>8} {'on/off':>7}")
    for quant in QUANTS:
        r = result[quant]
        print(
            f"{quant:6} {r['decode_tok_s_off']:>17} {r['decode_tok_s_on']:>8} {r['decode_ratio_on_off']:>7}"
            f"   {r['prompt_tok_s_off']:>17} {r['prompt_tok_s_on']:>8} {r['prompt_ratio_on_off']:>7}"
        )
        print(f"{'':6} weights off: {describe_buffers(r['buffers_off'])}; on: {describe_buffers(r['buffers_on'])}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
