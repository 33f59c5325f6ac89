"""Load the node's OpenAI-compatible HTTP API; compare with llama-cpp-python's own server.

All phases run in one process of this script, on one generated model ("medium50m", ~51M
parameters; "small", ~2.4M, with --quick), against processes on 127.0.0.1 only:

1. throughput: `/v1/completions` with max_tokens=1 from 16 concurrent aiohttp clients, first
   against a real `moc-node run`, then against `python -m llama_cpp.server` serving the same file
   (its `server` extra is installed into this venv on first use; when that is impossible the peer
   is reported unavailable, never estimated);
2. decode: 32-token completions, whole and streamed as server-sent events, one client, through
   the node versus `llama_cpp.Llama` in this process (tokens per second, request start to last
   token, both ways);
3. overload: a node whose bulkhead admits 4 (max_concurrent 2 + max_queue_size 2) under 16
   back-to-back clients (4x its capacity). Every answer must be a result or a 503 with
   Retry-After; anything else (another status, a reset, a timeout) is a silent loss. The accepted
   p99 is compared with one client alone ("unloaded") and with exactly 4 clients ("at capacity").

Both servers run with their default logging (each logs one access line per request).
Prints a table; `--json` adds one JSON object as the last line: rps, p99_ms, peer_rps,
peer_p99_ms, ratio_vs_peer, stream_ratio, overload_silent_losses (and more).

    .venv/bin/python bench/http_load.py --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

# The repository root, so `actors` imports without an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "m"
N_CTX = 256
PROMPT = "The quick brown fox jumps over the lazy dog."
DECODE_TOKENS = 32
OVERLOAD_BULKHEAD = (2, 2)  # max_concurrent, max_queue_size
START_TIMEOUT = 300.0


# ---- figures ----


@dataclass
class Phase:
    """What one load phase measured."""

    name: str
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    refused: int = 0
    """Answered 503 with Retry-After (the overload contract)."""
    silent: int = 0
    """Answered with neither a result nor a 503 + Retry-After, or not answered at all."""
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def hammer(
    name: str,
    url: str,
    body: dict[str, Any],
    clients: int,
    begin_at: float,
    end_at: float,
    polite: bool = False,
) -> Phase:
    """Send `body` from `clients` back-to-back loops until `end_at` (wall clock, `time.time()`).

    Answers that arrive before `begin_at` are a warm-up and not counted. A polite client sleeps
    for the Retry-After of a 503 before its next request, as the official OpenAI client does; an
    impolite one comes back at once (the worst case for the server).
    """
    phase = Phase(name, seconds=end_at - begin_at)
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            while time.time() < end_at:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json=body) as resp:
                        raw = await resp.read()
                        status, retry = resp.status, resp.headers.get("Retry-After")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if begin_at <= time.time() < end_at:
                        phase.silent += 1
                        note(phase, f"{type(exc).__name__}: {exc}")
                    continue
                elapsed_ms = (time.perf_counter() - t0) * 1000.0
                counted = begin_at <= time.time() < end_at
                if status == 200 and _has_choice(raw):
                    if counted:
                        phase.latencies_ms.append(elapsed_ms)
                elif status == 503 and retry:
                    phase.refused += counted
                    if polite:
                        await asyncio.sleep(min(float(retry), max(0.0, end_at - time.time())))
                elif counted:
                    phase.silent += 1
                    note(phase, f"HTTP {status}: {raw[:160]!r}")

        await asyncio.gather(*(one() for _ in range(clients)))
    return phase


def _client_process(args: tuple[Any, ...], out: Any) -> None:
    """Run one share of the clients in a separate process and send back what it measured."""
    out.put(asyncio.run(hammer(*args)))


async def load(
    name: str,
    url: str,
    body: dict[str, Any],
    clients: int,
    seconds: float,
    procs: int,
    polite: bool = False,
    warmup: float = 1.0,
) -> Phase:
    """Run `clients` concurrent clients for `seconds`, split over `procs` client processes."""
    procs = max(1, min(procs, clients))
    if procs == 1:
        begin = time.time() + warmup
        return await hammer(name, url, body, clients, begin, begin + seconds, polite)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    begin = time.time() + warmup + 2.0  # time for the interpreters to start and import aiohttp
    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    workers = [
        ctx.Process(
            target=_client_process,
            args=((name, url, body, n, begin, begin + seconds, polite), out),
        )
        for n in shares
    ]
    for w in workers:
        w.start()
    loop = asyncio.get_running_loop()
    parts: list[Phase] = [
        await loop.run_in_executor(None, out.get, True, seconds + 300) for _ in workers
    ]
    for w in workers:
        w.join(timeout=30)
    merged = merge(parts)
    merged.seconds = seconds  # the parts ran at the same time
    return merged


def merge(parts: list[Phase]) -> Phase:
    """Add up phases that ran one after the other."""
    merged = Phase(parts[0].name)
    for part in parts:
        merged.seconds += part.seconds
        merged.latencies_ms += part.latencies_ms
        merged.refused += part.refused
        merged.silent += part.silent
        merged.examples += part.examples
    return merged


def note(phase: Phase, text: str) -> None:
    if len(phase.examples) < 3:
        phase.examples.append(text)


def _has_choice(raw: bytes) -> bool:
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and bool(body.get("choices"))


# ---- decode rate: through the node versus llama_cpp here ----


def completion_body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "stream": stream,
    }


async def node_whole_once(session: aiohttp.ClientSession, url: str) -> float:
    """Return tokens/s of one whole completion through the node."""
    t0 = time.perf_counter()
    async with session.post(url, json=completion_body(DECODE_TOKENS)) as resp:
        body = await resp.json()
    if resp.status != 200:
        raise RuntimeError(f"completion failed: HTTP {resp.status} {body}")
    return float(body["usage"]["completion_tokens"]) / (time.perf_counter() - t0)


async def node_stream_once(session: aiohttp.ClientSession, url: str) -> float:
    """Return tokens/s of one SSE-streamed completion through the node (one event per piece)."""
    t0 = time.perf_counter()
    pieces = 0
    last = t0
    async with session.post(url, json=completion_body(DECODE_TOKENS, True)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"stream failed: HTTP {resp.status}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0]["text"]:
                pieces += 1
                last = time.perf_counter()
    return pieces / (last - t0)


class Direct:
    """The same model loaded with `llama_cpp.Llama` in this process, as the worker loads it."""

    def __init__(self, path: Path) -> None:
        import llama_cpp

        # As the node's worker loads it on a CPU: no mmap, llama.cpp's default thread count.
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=N_CTX, n_gpu_layers=0, seed=1, use_mmap=False, verbose=False
        )

    def loop_once(self) -> float:
        """Return tokens/s of the worker's own decode loop (the anchor): `Llama.generate` with
        the worker's sampling settings, detokenizing each token."""
        from actors.worker.backends.sampling import MIN_P, TOP_K

        _TOP_K, _MIN_P, _REPEAT_PENALTY = TOP_K, MIN_P, 1.0  # 1.0: the engine's, no penalty

        llm = self.llm
        t0 = time.perf_counter()
        llm.set_seed(1)
        tokens = [llm.token_bos(), *llm.tokenize(PROMPT.encode(), add_bos=False, special=True)]
        produced = 0
        stream = llm.generate(
            tokens, top_k=_TOP_K, top_p=0.9, min_p=_MIN_P, temp=0.0, repeat_penalty=_REPEAT_PENALTY
        )
        for token in stream:
            llm.detokenize([token])
            produced += 1
            if produced >= DECODE_TOKENS:
                break
        stream.close()
        return produced / (time.perf_counter() - t0)

    def api_once(self) -> float:
        """Return tokens/s of `create_completion(stream=True)`, the everyday in-process API."""
        t0 = time.perf_counter()
        pieces = 0
        last = t0
        chunks: Any = self.llm.create_completion(
            PROMPT, max_tokens=DECODE_TOKENS, temperature=0.0, seed=1, stream=True
        )
        for chunk in chunks:
            if chunk["choices"][0]["text"]:
                pieces += 1
                last = time.perf_counter()
        return pieces / (last - t0)


async def decode_rates(url: str, path: Path, runs: int) -> dict[str, float]:
    """Median tokens/s of the four ways, their runs interleaved so that noise from other
    processes on the machine falls on all of them alike. The node must be idle otherwise."""
    direct = Direct(path)
    rates: dict[str, list[float]] = {"whole": [], "stream": [], "loop": [], "api": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        for i in range(runs + 1):  # the first round is a warm-up
            got = {
                "whole": await node_whole_once(session, url),
                "stream": await node_stream_once(session, url),
                "loop": direct.loop_once(),
                "api": direct.api_once(),
            }
            if i:
                for key, value in got.items():
                    rates[key].append(value)
    del direct
    return {key: statistics.median(values) for key, values in rates.items()}


# ---- processes ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; raise with the log tail if the process dies or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)  # polling a condition with a deadline
    stop(proc)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{url} not ready (exit code {proc.returncode}); log tail:\n{tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_node(
    workdir: Path, model: Path, tag: str, bulkhead: tuple[int, int] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `moc-node run` serving `model` as MODEL; return the process and its base URL."""
    rest = free_port()
    limits = ""
    if bulkhead is not None:
        limits = (
            f"[resilience.bulkhead]\nmax_concurrent = {bulkhead[0]}\n"
            f"max_queue_size = {bulkhead[1]}\n"
        )
    config = workdir / f"{tag}.toml"
    config.write_text(
        f"""
[node]
name = "bench-{tag}"
state_dir = "{workdir / f"state-{tag}"}"
model_dirs = ["{model.parent}"]

[server]
host = "127.0.0.1"
rest_port = {rest}
zmq_port = {free_port()}
grpc_port = 0

[resources]
devices = "cpu"

{limits}
[[models.catalog]]
name = "{MODEL}"
path = "{model}"
n_ctx = {N_CTX}
preload = true
pin = true
""",
        encoding="utf-8",
    )
    log = workdir / f"{tag}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    url = f"http://127.0.0.1:{rest}"
    wait_http(proc, f"{url}/ready", log, START_TIMEOUT)
    return proc, url


def peer_available() -> str | None:
    """Make `llama_cpp.server` importable (installing its extra here); return why not, or None."""
    probe = [sys.executable, "-c", "import llama_cpp.server.app"]
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    from importlib.metadata import version

    # Pinned to the installed version, so pip adds the extra's packages and reuses the build.
    spec = f"llama-cpp-python[server]=={version('llama-cpp-python')}"
    print(f"installing {spec} for the peer server ...", file=sys.stderr)
    try:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", spec],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pip install failed: {exc}"
    if pip.returncode != 0:
        return f"pip install failed: {(pip.stderr or pip.stdout).strip().splitlines()[-1:]}"
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return "llama_cpp.server still not importable after installing its extra"
    return None


def start_peer(workdir: Path, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m llama_cpp.server` on the same file; return the process and base URL."""
    port = free_port()
    log = workdir / "peer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--model_alias",
                MODEL,
                "--n_ctx",
                str(N_CTX),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, f"{url}/v1/models", log, START_TIMEOUT)
    return proc, url


# ---- main ----


def row(phase: Phase) -> str:
    return (
        f"{phase.name:<48}{phase.ok:>8}{phase.refused:>8}{phase.silent:>8}{phase.rps:>9.0f}"
        f"{phase.pct(0.5):>9.2f}{phase.pct(0.99):>9.2f}"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase and print the table; return the JSON figures."""
    from actors.gguf_synth import write_preset

    size = "small" if args.quick else "medium50m"
    seconds = args.seconds or (4.0 if args.quick else 20.0)
    runs = 5 if args.quick else 20
    slices = 2 if args.quick else 4
    clients = args.clients
    completions = "/v1/completions"
    one_token = completion_body(1)
    phases: list[Phase] = []
    figures: dict[str, Any] = {"model": size, "clients": clients, "seconds": seconds}

    with tempfile.TemporaryDirectory(prefix="moc-http-bench-") as tmp:
        workdir = Path(tmp)
        model = write_preset(workdir / "models" / f"{size}.gguf", size, seed=1)

        node, url = start_node(workdir, model, "node")
        peer: subprocess.Popen[bytes] | None = None
        peer_url = ""
        why_not = peer_available()
        try:
            if why_not is None:
                try:
                    peer, peer_url = start_peer(workdir, model)
                except RuntimeError as exc:
                    why_not = str(exc).splitlines()[0]
            # Both servers up, loaded in turns: slow spells of a shared machine hit both alike.
            node_parts: list[Phase] = []
            peer_parts: list[Phase] = []
            for _ in range(slices):
                node_parts.append(
                    await load(
                        "moc-node /v1/completions max_tokens=1",
                        url + completions,
                        one_token,
                        clients,
                        seconds / slices,
                        args.client_procs,
                    )
                )
                if peer is not None:
                    peer_parts.append(
                        await load(
                            "llama_cpp.server, same requests",
                            peer_url + completions,
                            one_token,
                            clients,
                            seconds / slices,
                            args.client_procs,
                        )
                    )
            decode = await decode_rates(url + completions, model, runs)
        finally:
            stop(node)
            if peer is not None:
                stop(peer)
        node_phase = merge(node_parts)
        peer_phase = merge(peer_parts) if peer_parts else None
        phases.append(node_phase)
        if peer_phase is not None:
            phases.append(peer_phase)

        guarded, guarded_url = start_node(workdir, model, "guarded", OVERLOAD_BULKHEAD)
        capacity = sum(OVERLOAD_BULKHEAD)
        label = f"bulkhead {OVERLOAD_BULKHEAD[0]}+{OVERLOAD_BULKHEAD[1]}"
        target = guarded_url + completions
        try:
            alone = await load(f"{label}: 1 client (unloaded)", target, one_token, 1, seconds, 1)
            full = await load(
                f"{label}: {capacity} clients (at capacity)",
                target,
                one_token,
                capacity,
                seconds,
                1,
            )
            over = await load(
                f"{label}: {4 * capacity} clients, 4x, retry at once",
                target,
                one_token,
                4 * capacity,
                seconds,
                args.client_procs,
            )
            polite = await load(
                f"{label}: {4 * capacity} clients, 4x, honour Retry-After",
                target,
                one_token,
                4 * capacity,
                seconds,
                args.client_procs,
                polite=True,
            )
        finally:
            stop(guarded)
        phases += [alone, full, over, polite]

    procs = max(1, min(args.client_procs, clients))
    print(
        f"http_load: model {size} (generated), {seconds:g} s per phase, {os.cpu_count()} CPUs, "
        f"aiohttp clients in {procs} process(es); both servers log each request (their default)"
    )
    print(f"{'phase':<48}{'ok':>8}{'503':>8}{'silent':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for phase in phases:
        print(row(phase))
    ratio = node_phase.rps / peer_phase.rps if peer_phase and peer_phase.rps else None
    if peer_phase is None:
        print(f"llama_cpp.server: unavailable ({why_not})")
    else:
        print(
            f"node vs llama_cpp.server at {clients} clients: {ratio:.2f}x requests/s, p99 "
            f"{node_phase.pct(0.99):.1f} ms vs {peer_phase.pct(0.99):.1f} ms"
        )
    node_whole, node_stream = decode["whole"], decode["stream"]
    direct_loop, direct_api = decode["loop"], decode["api"]
    whole_ratio = node_whole / direct_loop
    stream_ratio = node_stream / direct_loop
    print(
        f"{DECODE_TOKENS}-token completions, one client, tokens/s from request start to last "
        f"token (median of {runs}):"
    )
    print(f"  llama_cpp in-process, the worker's decode loop  {direct_loop:8.1f}  (anchor)")
    print(f"  llama_cpp in-process, create_completion stream  {direct_api:8.1f}")
    print(
        f"  node, whole completion                          {node_whole:8.1f}  {whole_ratio:.3f}x"
    )
    print(
        f"  node, SSE stream                                {node_stream:8.1f}  {stream_ratio:.3f}x"
    )
    silent = sum(p.silent for p in (alone, full, over, polite))
    print(
        f"overload: {over.refused + polite.refused} answered 503 + Retry-After, {silent} silent "
        f"losses; accepted p99 (retry at once) {over.pct(0.99):.1f} ms = "
        f"{over.pct(0.99) / alone.pct(0.99):.2f}x unloaded, "
        f"{over.pct(0.99) / full.pct(0.99):.2f}x at capacity; (honouring Retry-After) "
        f"{polite.pct(0.99):.1f} ms = {polite.pct(0.99) / alone.pct(0.99):.2f}x unloaded"
    )
    for phase in phases:
        for example in phase.examples:
            print(f"  {phase.name}: {example}")

    figures.update(
        {
            "rps": round(node_phase.rps, 1),
            "p99_ms": round(node_phase.pct(0.99), 3),
            "p50_ms": round(node_phase.pct(0.5), 3),
            "peer_rps": round(peer_phase.rps, 1) if peer_phase else None,
            "peer_p99_ms": round(peer_phase.pct(0.99), 3) if peer_phase else None,
            "ratio_vs_peer": round(ratio, 3) if ratio is not None else None,
            "peer_unavailable": why_not,
            "node_tok_s": round(node_whole, 1),
            "node_stream_tok_s": round(node_stream, 1),
            "direct_tok_s": round(direct_loop, 1),
            "direct_create_completion_tok_s": round(direct_api, 1),
            "completion_ratio": round(whole_ratio, 4),
            "stream_ratio": round(stream_ratio, 4),
            "overload_silent_losses": silent,
            "overload_refused": over.refused,
            "overload_accepted": over.ok,
            "overload_p99_ms": round(over.pct(0.99), 3),
            "overload_polite_p99_ms": round(polite.pct(0.99), 3),
            "unloaded_p99_ms": round(alone.pct(0.99), 3),
            "at_capacity_p99_ms": round(full.pct(0.99), 3),
        }
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model, short phases (<2 min)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, help="length of each load phase")
    parser.add_argument(
        "--client-procs", type=int, default=1, help="client processes sharing the clients"
    )
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
