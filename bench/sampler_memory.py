"""Show where a worker's memory went when each request built its own llama.cpp sampler chain.

llama-cpp-python alone, none of our code: `Llama.generate` builds a sampler chain per call
(`Llama._init_sampler`) and drops the previous one. `LlamaSampler` is a reference cycle (its
ExitStack's callback holds the object), so the dropped chain's native memory (10-15 KiB, mostly
the dist sampler's state) is freed only by Python's cyclic collector, and a chain that outlives
a young collection waits for a full one. Prints, every `--every` calls: the RSS, glibc's bytes
in use (mallinfo2), the LlamaSampler objects still alive, and the full collections so far; then
what a full collection and malloc_trim give back. `--close` closes each chain once the next one
is built (what actors/worker/backends/sampler_cache.py does with the chains it evicts): flat.

    .venv/bin/python bench/sampler_memory.py               # the creep
    .venv/bin/python bench/sampler_memory.py --close       # the fix
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


def in_use_kb() -> int:
    """Return the bytes glibc's malloc has handed out and not had back, in KiB."""
    return int(_LIBC.mallinfo2().uordblks) // 1024


def rss_kb() -> int:
    """Return this process's resident set size in KiB."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * 4


def main(argv: list[str] | None = None) -> int:
    """Run the calls and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=150_000)
    parser.add_argument("--every", type=int, default=25_000)
    parser.add_argument("--close", action="store_true", help="close each chain when replaced")
    args = parser.parse_args(argv)

    import llama_cpp

    from actors.gguf_synth import write_preset

    with tempfile.TemporaryDirectory() as tmp:
        path = write_preset(Path(tmp) / "tiny.gguf", "tiny", seed=1)
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=256, n_threads=1, use_mmap=False, verbose=False
        )
    tokens = llm.tokenize(b"hello")
    build = llm._init_sampler

    def closing_build(**params: Any) -> Any:
        previous = llm._sampler
        chain = build(**params)
        if previous is not None:
            previous.close()  # generate replaces it with `chain` before sampling
        return chain

    if args.close:
        cast(Any, llm)._init_sampler = closing_build

    def one_call() -> None:
        stream = llm.generate(tokens, temp=0.7, top_p=0.9)
        next(stream)
        stream.close()

    full = [0]
    gc.callbacks.append(
        lambda phase, info: full.__setitem__(
            0, full[0] + (phase == "stop" and info["generation"] == 2)
        )
    )
    for _ in range(2000):
        one_call()
    gc.collect()
    full[0] = 0
    rss0, used0 = rss_kb(), in_use_kb()
    print(f"llama-cpp-python {llama_cpp.__version__}, {'--close' if args.close else 'as is'}")
    print(f"{'calls':>8}{'RSS KiB':>10}{'in use KiB':>12}{'live chains':>13}{'full GCs':>10}")
    for i in range(1, args.calls + 1):
        one_call()
        if i % args.every == 0:
            live = sum(type(o) is llama_cpp._internals.LlamaSampler for o in gc.get_objects())
            print(
                f"{i:>8}{rss_kb() - rss0:>+10,}{in_use_kb() - used0:>+12,}{live:>13}{full[0]:>10}"
            )
    gc.collect()
    print(f"after gc.collect():  RSS {rss_kb() - rss0:+,} KiB, in use {in_use_kb() - used0:+,} KiB")
    _LIBC.malloc_trim(0)
    print(
        f"after malloc_trim(0): RSS {rss_kb() - rss0:+,} KiB, in use {in_use_kb() - used0:+,} KiB"
    )
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
