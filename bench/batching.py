"""Serving under concurrency: the node against llama.cpp's own server, in one run (issue 15).

On the ~51M generated model ("medium50m", f32), on 127.0.0.1:

1. `moc-node run` (a real process, the model in its catalog) and `llama-server -np 8` (its own
   defaults; context 8 x N_CTX so each slot has the node's context), both up, then
   `llama_cpp.server` (llama-cpp-python's own server, its defaults) alone:
   - aggregate tokens/s of 1, 4 and 8 concurrent 32-token streams (closed-loop clients, each
     sends its next request when the last ends; tokens summed over clients / wall time). The
     node and llama-server take turns in legs (node, server, server, node...; at 1 stream
     ONE_STREAM_LEGS times as many, its legs being the shortest): the host's speed
     drifts within a minute, and measuring one server after the other let that drift decide
     the 1-stream ratio (0.75-0.95 across runs of the same code); the idle one uses ~0.5% of a
     CPU. Time to the first content token: TTFT p50 at 1 stream of a leg's later rounds;
     at 8 streams, node and llama-server only, of 8 clients whose first requests are spread
     over one stream's time (measured in the 8-stream legs), in SPREAD_LEGS legs each taken
     in turn: the p50 of the requests sent while the other 7 streams ran, each joining
     them, as requests of independent clients do (`streams`' `spread_over`). Streams that
     start together end in the same step, so the legs' later rounds arrive as bursts of 8
     ("8 in step", the figure this bench judged before) and their first rounds all at once
     after a warm-up request ("8 at once"): both reported, not judged;
   - node and llama-server only: 8 chats interleaved (every first turn, then every second
     turn, one request at a time); each second turn repeats its first turn's prompt and answer
     (~80% of the context) and adds a line: second-turn TTFT / first-turn TTFT says whether a
     server reuses a conversation's cached prefix while others ran in between;
   - node and llama-server only: 1-token `/v1/completions` req/s at 16 clients;
   - node and llama-server only: greedy texts of 8 prompts sent at once, 3 times, against the
     same prompts sent alone: how many differ;
2. `llama-batched-bench`, decode only, 1, 4 and 8 parallel sequences: the ceiling;
3. bench/sse_floor.py, an aiohttp server that answers a stream at once without a model: TTFT
   p50 of 1-token requests alone and 8 at once, the floor of the bursts (on 2 cores a burst
   of 8 cost even that server 2.3-2.8x its TTFT alone in three full runs, 4.3x in a quick
   one: docs/benchmarks.md).

llama.cpp's tools are built from the source the installed llama-cpp-python vendors
(bench/llama_tools.py). The node is measured as its catalog configures it: the catalog keys
`parallel` and `threads` are written only when `CatalogEntry` has them (`--node-parallel`,
`--node-threads`), so the same script measures the node before and after continuous batching.

    .venv/bin/python bench/batching.py --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _path in (str(ROOT), str(BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import llama_tools  # noqa: E402
from http_load import (  # noqa: E402
    MODEL,
    PROMPT,
    START_TIMEOUT,
    completion_body,
    free_port,
    load,
    peer_available,
    stop,
    wait_http,
)

SIZE = "medium50m"
N_CTX = 512
"""Context per sequence: the node's n_ctx, each llama-server slot's share."""
SLOTS = 8
STREAM_TOKENS = 32
LEVELS = (1, 4, 8)
CHATS = 8
PREFIX_CHARS = 400
"""First-turn prompt length; the vocabulary is bytes, so ~one token a character."""
TURN_TOKENS = 8
RPS_CLIENTS = 16
ONE_STREAM_LEGS = 4
"""One stream runs this many times the legs of the other levels: its legs are the shortest
(~3 s a server in a full run), and its goal the thinnest margin; more legs, less noise."""
SPREAD_LEGS = 2
SPREAD_ROUNDS = 6
"""Spread streams: legs per server and rounds per client (5 later rounds of 8 clients, 40
TTFTs a leg; a few seconds a leg)."""
FLOOR_ROUNDS = 16
"""Requests alone, and bursts of SLOTS, sent to the do-nothing server."""

GOALS = {
    "ratio_1": (">=", 0.9),
    "ratio_8": (">=", 0.85),
    "ttft_ratio_8_vs_1": ("<=", 2.0),
    "prefix_ttft_ratio": ("<=", 0.25),
    "rps_ratio_vs_llama_server": (">=", 1.5),
}


# ---- one streamed request ----


async def stream_once(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int
) -> tuple[float, int, str]:
    """Send one streamed completion; return (TTFT s, tokens produced, text).

    TTFT is request start to the first event carrying text. Tokens are the server's
    `usage.completion_tokens` when it sends usage, else the events that carried text.
    """
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first: float | None = None
    events = 0
    usage: int | None = None
    text: list[str] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status} {(await resp.read())[:300]!r}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if isinstance(data.get("usage"), dict):
                usage = int(data["usage"].get("completion_tokens") or 0) or usage
            for choice in data.get("choices") or ():
                piece = choice.get("text") or ""
                if piece:
                    first = first if first is not None else time.perf_counter()
                    events += 1
                    text.append(piece)
    if first is None:
        raise RuntimeError(f"{url}: a stream ended without a content token")
    return first - t0, usage if usage is not None else events, "".join(text)


# ---- phases ----


def session_for(clients: int) -> aiohttp.ClientSession:
    """A connection per request: llama-server (cpp-httplib) closes a kept-alive connection
    after 5 requests, and a request racing that close fails; each server pays the same."""
    connector = aiohttp.TCPConnector(limit=clients, force_close=True)
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), connector=connector)


@dataclasses.dataclass
class Leg:
    """Closed-loop streams against one server: the TTFTs of each client's first request and of
    its later ones; of those later ones, the TTFTs of the requests sent while every other
    client's stream was running (`joined`); the tokens, the streams that ended short, the rounds
    per client, the wall time."""

    opening_ttfts: list[float]
    ttfts: list[float]
    joined: list[float]
    tokens: int
    short: int
    rounds: int
    seconds: float


async def streams(url: str, clients: int, rounds: int, spread_over: float = 0.0) -> Leg:
    """`clients` closed-loop clients, `rounds` 32-token streams each (a stream ends short when
    llama_cpp.server ends it because another request arrived: its `interrupt_requests`).

    They start together, so their first requests arrive all at once; and streams that start in
    the same step end in the same step, so every later round arrives as a burst too ("in
    step"). With `spread_over` (seconds, one stream's time at this load), client i starts
    i * spread_over / clients after client 0 instead: where every stream advances one token a
    step, as in both servers' continuous batching, streams of equal length then stay apart, and
    a later request joins the others' running streams, as requests of independent clients do.
    """
    opening: list[float] = []
    ttfts: list[float] = []
    joined: list[float] = []
    tokens = short = running = 0
    async with session_for(clients) as session:
        await stream_once(session, url, PROMPT, 4)  # warm-up: connections, first-use costs

        async def client(i: int) -> None:
            nonlocal tokens, short, running
            prompt = f"Client {i}. {PROMPT}"  # its own prompt: no cache shared across clients
            if spread_over:  # so that each later request joins streams already decoding
                await asyncio.sleep(i * spread_over / clients)
            for r in range(rounds):
                others = running
                running += 1
                try:
                    ttft, produced, _text = await stream_once(session, url, prompt, STREAM_TOKENS)
                finally:
                    running -= 1
                (ttfts if r else opening).append(ttft)
                if r and others == clients - 1:
                    joined.append(ttft)
                tokens += produced
                short += produced < STREAM_TOKENS

        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - began
    return Leg(opening, ttfts, joined, tokens, short, rounds, wall)


def in_turn(names: Collection[str], legs: int) -> list[str]:
    """The order of `legs` legs of every server: A B, B A, A B..."""
    order = list(names)
    return [name for leg in range(legs) for name in (order if leg % 2 == 0 else order[::-1])]


async def alternating(
    urls: dict[str, str],
    clients: int,
    legs: int,
    per_leg: int,
    spread_over: dict[str, float] | None = None,
) -> dict[str, list[Leg]]:
    """Each server's streams at `clients` in `legs` legs of `per_leg` rounds (`streams`; spread
    over each server's own `spread_over` seconds when given), the servers taken in turn (A B,
    B A, A B...): a 2-core host's speed drifts by 20% within a minute, and legs in turn let that
    drift weigh on every server alike."""
    done: dict[str, list[Leg]] = {name: [] for name in urls}
    for name in in_turn(urls, legs):
        offset = spread_over[name] if spread_over else 0.0
        done[name].append(await streams(urls[name], clients, per_leg, offset))
    return done


def in_step_figures(legs: list[Leg]) -> dict[str, float]:
    """A level's figures from its in-step legs: tokens/s over the legs; TTFT p50 of the later
    rounds and of the first ones (every client at once, right after the leg's warm-up); one
    round's time (a stream's at this load); tokens; short streams; seconds."""
    seconds = sum(g.seconds for g in legs)
    return {
        "tok_s": sum(g.tokens for g in legs) / seconds,
        "in_step_ttft_p50_ms": statistics.median(t for g in legs for t in g.ttfts) * 1000,
        "opening_ttft_p50_ms": statistics.median(t for g in legs for t in g.opening_ttfts) * 1000,
        "stream_s": seconds / sum(g.rounds for g in legs),
        "tokens": sum(g.tokens for g in legs),
        "short": sum(g.short for g in legs),
        "seconds": seconds,
    }


def spread_figures(legs: list[Leg]) -> dict[str, float]:
    """TTFT p50 of the spread legs' requests that joined every other client's running stream;
    how many did, of how many later requests (the rest came while a neighbour was between two
    streams); short streams."""
    joined = [t for g in legs for t in g.joined]
    return {
        "spread_ttft_p50_ms": statistics.median(joined) * 1000 if joined else float("nan"),
        "joined": len(joined),
        "later": sum(len(g.ttfts) for g in legs),
        "short": sum(g.short for g in legs),
    }


async def floor(url: str) -> dict[str, float]:
    """TTFT p50 of 1-token requests to bench/sse_floor.py's do-nothing server, alone and
    SLOTS at once, FLOOR_ROUNDS times each: what the harness and an aiohttp front cost a
    request, and a burst of them (the floor of the "8 in step" and "8 at once" columns)."""
    got: dict[str, float] = {}
    async with session_for(SLOTS) as session:
        await stream_once(session, url, PROMPT, 1)  # warm-up
        for label, n in (("alone", 1), ("at_once", SLOTS)):
            ttfts = []
            for _ in range(FLOOR_ROUNDS):
                sent = (stream_once(session, url, f"Client {i}. {PROMPT}", 1) for i in range(n))
                ttfts += [ttft for ttft, _n, _text in await asyncio.gather(*sent)]
            got[label] = statistics.median(ttfts) * 1000
    return got


TOGETHER_TOKENS = 24
TOGETHER_ROUNDS = 3


async def together(url: str) -> dict[str, float]:
    """Greedy texts of `together_prompts()` sent one at a time, then all at once TOGETHER_ROUNDS
    times: how many of the concurrent texts differ from the same prompt's alone (llama.cpp's
    kernels are not batch-invariant, so a near-tie can flip)."""
    prompts = together_prompts()
    async with session_for(len(prompts)) as session:
        alone = [(await stream_once(session, url, p, TOGETHER_TOKENS))[2] for p in prompts]
        differed = 0
        for _ in range(TOGETHER_ROUNDS):
            texts = await asyncio.gather(
                *(stream_once(session, url, p, TOGETHER_TOKENS) for p in prompts)
            )
            differed += sum(a != t[2] for a, t in zip(alone, texts, strict=True))
    return {"differed": float(differed), "of": float(TOGETHER_ROUNDS * len(prompts))}


def together_prompts() -> list[str]:
    """Eight prompts that share little: four short ones, the openings of four chats."""
    short = ["Lorem ipsum dolor sit amet", "Once upon a time", "The quick brown fox", "zz"]
    return short + [chat_prefix(chat)[:80] for chat in range(4)]


def chat_prefix(chat: int) -> str:
    """A first-turn prompt of PREFIX_CHARS, its own from the first characters on."""
    rng = random.Random(chat)
    words = ["river", "stone", "quiet", "lamp", "orbit", "maple", "signal", "copper", "wander"]
    text = f"Chat {chat}. Notes:"
    while len(text) < PREFIX_CHARS - 4:
        text += " " + rng.choice(words)
    return text[: PREFIX_CHARS - 4] + "\nQ:"


async def chats(url: str) -> dict[str, float]:
    """CHATS conversations interleaved, one request at a time: all first turns, then all second
    turns (first prompt + its answer + a new line). Return both TTFT medians and their ratio."""
    first_ttfts: list[float] = []
    second_ttfts: list[float] = []
    async with session_for(1) as session:
        await stream_once(session, url, PROMPT, 2)  # warm-up, a prompt no chat shares
        turns: list[str] = []
        for chat in range(CHATS):
            prompt = chat_prefix(chat)
            ttft, _n, answer = await stream_once(session, url, prompt, TURN_TOKENS)
            first_ttfts.append(ttft)
            turns.append(prompt + answer + "\nAnd then?\nQ:")
        for prompt in turns:
            ttft, _n, _answer = await stream_once(session, url, prompt, TURN_TOKENS)
            second_ttfts.append(ttft)
    first, second = statistics.median(first_ttfts), statistics.median(second_ttfts)
    return {
        "first_ttft_ms": first * 1000,
        "second_ttft_ms": second * 1000,
        "ratio": second / first,
        "second_prompt_chars": float(statistics.median(len(t) for t in turns)),
    }


async def rps(url: str, seconds: float) -> dict[str, float]:
    """1-token completions from RPS_CLIENTS back-to-back clients (bench/http_load.py's load)."""
    phase = await load("1-token", url + "/v1/completions", completion_body(1), RPS_CLIENTS,
                       seconds, 1)
    return {"rps": phase.rps, "p99_ms": phase.pct(0.99), "silent": float(phase.silent)}


async def measure(
    urls: dict[str, str], legs: int, per_leg: int, seconds: float, full: bool
) -> dict[str, dict[str, Any]]:
    """Every phase against the servers in `urls` (all up): the streams in alternating legs, then
    with `full` the chats and the 1-token load, one server after the other."""
    out: dict[str, dict[str, Any]] = {name: {"streams": {}} for name in urls}
    for clients in LEVELS:
        level_legs = legs * ONE_STREAM_LEGS if clients == 1 else legs
        for name, got in (await alternating(urls, clients, level_legs, per_leg)).items():
            out[name]["streams"][clients] = in_step_figures(got)
            progress(f"{name}, {clients} streams: {out[name]['streams'][clients]['tok_s']:.1f} "
                     "tokens/s")
    if full:
        stream_s = {name: out[name]["streams"][SLOTS]["stream_s"] for name in urls}
        spread = await alternating(urls, SLOTS, SPREAD_LEGS, SPREAD_ROUNDS, stream_s)
        for name, got in spread.items():
            out[name]["spread"] = spread_figures(got)
            progress(f"{name}, {SLOTS} streams arriving spread: TTFT p50 "
                     f"{out[name]['spread']['spread_ttft_p50_ms']:.1f} ms")
        for name, url in urls.items():
            out[name]["chats"] = await chats(url)
            progress(f"{name}, chats: second/first TTFT {out[name]['chats']['ratio']:.3f}")
            out[name]["rps"] = await rps(url, seconds)
            progress(f"{name}, 1-token: {out[name]['rps']['rps']:.0f} req/s")
            out[name]["together"] = await together(url)
    return out


def progress(text: str) -> None:
    """One line on stderr as each phase ends: a long run shows where it is."""
    print(f"batching {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


# ---- servers ----


def node_catalog_keys(parallel: int | None, threads: int | None) -> dict[str, int]:
    """The catalog keys to write: `parallel` and `threads` where the node has them."""
    from actors.serving.config import CatalogEntry

    known = {f.name for f in dataclasses.fields(CatalogEntry)}
    wanted = {"parallel": parallel, "threads": threads}
    missing = [k for k, v in wanted.items() if v is not None and k not in known]
    if missing:
        raise SystemExit(f"this node's catalog has no key {', '.join(missing)} (CatalogEntry)")
    if parallel is None and "parallel" in known:
        wanted["parallel"] = SLOTS  # as llama-server -np 8
    return {k: v for k, v in wanted.items() if v is not None}


def start_node(workdir: Path, model: Path, keys: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    """`moc-node run` with `model` in its catalog as MODEL (context N_CTX, `keys` added)."""
    rest = free_port()
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    config = workdir / "node.toml"
    config.write_text(
        f'[node]\nname = "bench-batching"\nstate_dir = "{workdir / "state"}"\n'
        f'model_dirs = ["{model.parent}"]\n\n'
        f'[server]\nhost = "127.0.0.1"\nrest_port = {rest}\nzmq_port = {free_port()}\n'
        f"grpc_port = 0\n\n"
        f'[resources]\ndevices = "cpu"\n\n'
        f'[[models.catalog]]\nname = "{MODEL}"\npath = "{model}"\nn_ctx = {N_CTX}\n'
        f"preload = true\npin = true\n{extra}",
        encoding="utf-8",
    )
    return launch(
        [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
        workdir / "node.log", rest, "/ready",
    )


def start_llama_server(workdir: Path, model: Path, tool: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`llama-server -np 8`, context for 8 slots of N_CTX, every other setting its default."""
    port = free_port()
    argv = [str(tool), "-m", str(model), "-np", str(SLOTS), "-c", str(SLOTS * N_CTX),
            "--host", "127.0.0.1", "--port", str(port)]
    return launch(argv, workdir / "llama-server.log", port, "/health", llama_tools.env_for(tool))


def start_llama_cpp_server(workdir: Path, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m llama_cpp.server` on the file, its defaults."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
            "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    return launch(argv, workdir / "llama_cpp.server.log", port, "/v1/models")


def start_sse_floor(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench/sse_floor.py: an aiohttp server that answers a stream at once and does nothing."""
    port = free_port()
    argv = [sys.executable, str(BENCH / "sse_floor.py"), str(port)]
    return launch(argv, workdir / "sse_floor.log", port, "/health")


def launch(
    argv: list[str], log: Path, port: int, ready: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server logging to `log`; return it once `ready` answers 200."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + ready, log, START_TIMEOUT)
    return proc, url


def llama_server_settings(tool: Path, log: Path) -> dict[str, Any]:
    """What llama-server chose itself: cache_prompt (its --help; /props omits it), threads (its
    log)."""
    said = subprocess.run([str(tool), "--help"], capture_output=True, text=True,
                          env=llama_tools.env_for(tool), timeout=60, check=False)
    default = re.search(r"--cache-prompt\b.*\(default: (\w+)\)", said.stdout + said.stderr)
    threads = re.search(r"n_threads = (\d+)", log.read_text(errors="replace"))
    return {
        "cache_prompt": default.group(1) if default else None,
        "n_threads": int(threads.group(1)) if threads else None,
    }


def batched_bench(
    tool: Path, model: Path, npl: tuple[int, ...], ntg: int, npp: int, n_ctx: int
) -> dict[int, float]:
    """`llama-batched-bench` with its defaults: decode-only tokens/s per parallel sequences."""
    argv = [str(tool), "-m", str(model), "-c", str(n_ctx), "-npp", str(npp), "-ntg", str(ntg),
            "-npl", ",".join(map(str, npl)), "--output-format", "jsonl"]
    done = subprocess.run(argv, capture_output=True, text=True, env=llama_tools.env_for(tool),
                          timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({done.returncode}): {done.stderr[-800:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    speeds = {int(r["pl"]): float(r["speed_tg"]) for r in rows}
    if set(speeds) != set(npl):
        raise RuntimeError(
            f"llama-batched-bench printed rows for {sorted(speeds)}, not {sorted(npl)}:"
            f" {done.stdout[-400:]!r} {done.stderr[-800:]!r}"
        )
    return speeds


# ---- main ----


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from actors.gguf_synth import write_preset

    wanted = args.rounds or (4 if args.quick else 12)
    legs = 2 if args.quick else 3
    per_leg = max(2, -(-wanted // legs))  # a first round, and at least one after it
    if legs * per_leg != wanted:
        progress(f"--rounds {wanted}: {legs * per_leg} rounds ({legs} legs of {per_leg})")
    seconds = 4.0 if args.quick else 15.0
    version = llama_tools.installed_version()
    tools = llama_tools.build(version)
    keys = node_catalog_keys(args.node_parallel, args.node_threads)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="moc-batching-") as tmp:
        workdir = Path(tmp)
        model = write_preset(workdir / "models" / f"{args.size}.gguf", args.size, seed=1)

        progress(f"model written; starting the node (catalog keys {keys}) and llama-server")
        node, node_url = start_node(workdir, model, keys)
        try:
            server, server_url = start_llama_server(workdir, model, tools["llama-server"])
            try:
                settings = llama_server_settings(tools["llama-server"], workdir / "llama-server.log")
                urls = {"node": node_url, "llama-server": server_url}
                results.update(await measure(urls, legs, per_leg, seconds, full=True))
            finally:
                stop(server)
        finally:
            stop(node)

        progress("the do-nothing server (bench/sse_floor.py)")
        proc, url = start_sse_floor(workdir)
        try:
            floor_ms = await floor(url)
        finally:
            stop(proc)

        why_not = peer_available()
        if why_not is None:
            progress("starting llama_cpp.server")
            proc, url = start_llama_cpp_server(workdir, model)
            try:
                urls = {"llama_cpp.server": url}
                results.update(await measure(urls, 1, legs * per_leg, seconds, full=False))
            finally:
                stop(proc)

        progress("llama-batched-bench")
        npp = len(f"Client 0. {PROMPT}")
        ceiling = batched_bench(tools["llama-batched-bench"], model, LEVELS, STREAM_TOKENS, npp,
                                SLOTS * N_CTX)
    shape = Shape(args.size, legs, per_leg, seconds, version)
    return report(results, ceiling, floor_ms, settings, keys, why_not, shape)


@dataclasses.dataclass(frozen=True)
class Shape:
    """How the run was made: its model, the legs and rounds of each stream level, the 1-token
    load's seconds, the llama.cpp tools' version."""

    size: str
    legs: int
    per_leg: int
    seconds: float
    version: str


def report(
    results: dict[str, dict[str, Any]],
    ceiling: dict[int, float],
    floor_ms: dict[str, float],
    settings: dict[str, Any],
    keys: dict[str, int],
    why_not: str | None,
    shape: Shape,
) -> dict[str, Any]:
    """Print the table; return the JSON figures."""
    built = llama_tools.describe(shape.version)
    node, server = results["node"], results["llama-server"]
    rounds = shape.legs * shape.per_leg

    def tok(name: str, n: int) -> float:
        return float(results[name]["streams"][n]["tok_s"])

    def ttft(name: str, n: int) -> float:
        return float(results[name]["streams"][n]["in_step_ttft_p50_ms"])

    def spread_ttft(name: str) -> float:
        return float(results[name]["spread"]["spread_ttft_p50_ms"])

    print(f"batching: model {shape.size} (generated, f32), {os.cpu_count()} CPUs, {STREAM_TOKENS}-"
          f"token streams, {rounds} per client per level, {rounds * ONE_STREAM_LEGS} at 1 stream "
          f"(node and llama-server in turn, legs of {shape.per_leg}); n_ctx {N_CTX} per sequence")
    print(f"llama.cpp tools: llama-cpp-python {built.get('llama_cpp_python')}, "
          f"{str(built.get('llama_server_version', '?')).replace(chr(10), '; ')}")
    flags: Any = built.get("cmake_flags") or []
    print(f"  build flags: {' '.join(map(str, flags))}; CPU {built.get('cpu')}")
    print(f"  llama-server -np {SLOTS} -c {SLOTS * N_CTX}: chose n_threads "
          f"{settings.get('n_threads')}, cache_prompt {settings.get('cache_prompt')}")
    print(f"node catalog keys added: {keys or 'none (the node has no parallel/threads yet)'}")
    top = LEVELS[-1]
    print(f"\naggregate tokens/s{'':14}" + "".join(f"{n:>9}" for n in LEVELS)
          + f"{f'{top} vs 1':>9}{'TTFT1 ms':>10}{f'TTFT{top} ms':>10}{f'{top} in step':>11}"
          f"{f'{top} at once':>11}{'short':>7}")
    for name, got in results.items():
        s = got["streams"]
        spread = f"{spread_ttft(name):.1f}" if "spread" in got else "-"
        print(f"{name:<32}" + "".join(f"{s[n]['tok_s']:9.1f}" for n in LEVELS)
              + f"{s[top]['tok_s'] / s[1]['tok_s']:8.2f}x{ttft(name, 1):10.1f}{spread:>10}"
              f"{ttft(name, top):11.1f}{s[top]['opening_ttft_p50_ms']:11.1f}"
              f"{sum(v['short'] for v in s.values()):7d}")
    print(f"  TTFT{top}: {top} clients whose arrivals are spread over a stream's time; p50 of "
          f"the requests sent while the other {top - 1} streams ran ({node['spread']['joined']}"
          f" of the node's {node['spread']['later']} later requests)\n"
          f"  {top} in step: the legs' later rounds, whose streams end in the same step (bursts "
          f"of {top}); {top} at once: their first rounds")
    print(f"  the floor (bench/sse_floor.py, an aiohttp server that answers at once, 1 token): "
          f"TTFT p50 alone {floor_ms['alone']:.1f} ms, {SLOTS} at once {floor_ms['at_once']:.1f}"
          f" ms ({floor_ms['at_once'] / floor_ms['alone']:.2f}x)")
    print(f"{'llama-batched-bench decode only':<32}"
          + "".join(f"{ceiling.get(n, 0):9.1f}" for n in LEVELS))
    if why_not is not None:
        print(f"llama_cpp.server: unavailable ({why_not})")
    print(f"\n{CHATS} interleaved chats (second turn ~{node['chats']['second_prompt_chars']:.0f} "
          f"tokens, first ~{PREFIX_CHARS}):")
    for name in ("node", "llama-server"):
        c = results[name]["chats"]
        print(f"  {name:<14} first-turn TTFT {c['first_ttft_ms']:8.1f} ms, second-turn "
              f"{c['second_ttft_ms']:8.1f} ms: {c['ratio']:.3f}x")
    print(f"greedy texts of {len(together_prompts())} prompts sent at once ({TOGETHER_ROUNDS} "
          f"times) that differ from the same prompt alone:")
    for name in ("node", "llama-server"):
        t = results[name]["together"]
        print(f"  {name:<14} {t['differed']:.0f} of {t['of']:.0f}")
    print(f"1-token req/s at {RPS_CLIENTS} clients ({shape.seconds:g} s):")
    for name in ("node", "llama-server"):
        r = results[name]["rps"]
        print(f"  {name:<14} {r['rps']:8.0f} req/s, p99 {r['p99_ms']:.1f} ms, "
              f"{r['silent']:.0f} failed")

    figures: dict[str, Any] = {
        "ratio_1": tok("node", 1) / tok("llama-server", 1),
        "ratio_8": tok("node", 8) / tok("llama-server", 8),
        "scale_8_vs_1": tok("node", 8) / tok("node", 1),
        "ttft_ratio_8_vs_1": spread_ttft("node") / ttft("node", 1),
        "ttft_in_step_ratio_8_vs_1": ttft("node", 8) / ttft("node", 1),
        "prefix_ttft_ratio": node["chats"]["ratio"],
        "rps_ratio_vs_llama_server": node["rps"]["rps"] / server["rps"]["rps"],
    }
    print("\ngoals:")
    for key, (sign, goal) in GOALS.items():
        value = figures[key]
        met = value >= goal if sign == ">=" else value <= goal
        print(f"  {key:<28}{value:8.3f}   goal {sign} {goal:<5} {'met' if met else 'NOT met'}")
        if key == "ttft_ratio_8_vs_1":
            print(f"    read as requests that join 7 running streams; bursts of 8 in step: "
                  f"{figures['ttft_in_step_ratio_8_vs_1']:.3f} (not judged; llama-server: in step "
                  f"{ttft('llama-server', 8) / ttft('llama-server', 1):.2f}x, spread "
                  f"{spread_ttft('llama-server') / ttft('llama-server', 1):.2f}x)")
    print(f"  {'scale_8_vs_1':<28}{figures['scale_8_vs_1']:8.3f}   (llama-server "
          f"{tok('llama-server', 8) / tok('llama-server', 1):.2f}x)")

    def rounded(got: dict[str, Any], key: str) -> dict[int, float]:
        return {n: round(v[key], 1) for n, v in got["streams"].items()}

    raw: dict[str, Any] = {
        name: {
            "tok_s": rounded(got, "tok_s"),
            "in_step_ttft_p50_ms": rounded(got, "in_step_ttft_p50_ms"),
            "opening_ttft_p50_ms": rounded(got, "opening_ttft_p50_ms"),
            "short_streams": sum(v["short"] for v in got["streams"].values()),
            **{
                key: {k: round(v, 3) for k, v in got[key].items()}
                for key in ("spread", "chats", "rps")
                if key in got
            },
            **({"together": got["together"]} if "together" in got else {}),
        }
        for name, got in results.items()
    }
    return {
        **{k: round(v, 3) for k, v in figures.items()},
        "servers": raw,
        "batched_bench_tok_s": {n: round(v, 1) for n, v in ceiling.items()},
        "floor_ttft_p50_ms": {k: round(v, 2) for k, v in floor_ms.items()},
        "llama_server_settings": settings,
        "node_catalog_keys": keys,
        "llama_cpp_server_unavailable": why_not,
        "tools": built,
        "rounds": rounds,
        "legs": shape.legs,
        "one_stream_legs": shape.legs * ONE_STREAM_LEGS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 streams per client per level (16 at 1 stream), shorter loads")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--rounds", type=int, help="streams per client per level")
    parser.add_argument("--size", default=SIZE, help="generated preset (a smoke test: tiny)")
    parser.add_argument("--node-parallel", type=int,
                        help=f"catalog `parallel` (default {SLOTS} where the node has the key)")
    parser.add_argument("--node-threads", type=int,
                        help="catalog `n_threads` (default: unset, the node chooses)")
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
