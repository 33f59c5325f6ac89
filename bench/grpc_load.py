"""1-token legacy Infer over gRPC, ZeroMQ and HTTP against one node, in one run.

One real `moc-node run` process serves a generated tiny GGUF on 127.0.0.1; the same request
(model "tiny", input_text "hello", max_tokens 1) is sent by 16 concurrent clients through each
front in turn:

- gRPC: `ModelOps.Infer` with the stub generated from proto/modelops.proto, one channel (one
  HTTP/2 connection) per client;
- ZeroMQ: the legacy `infer` action on one REQ socket per client;
- HTTP: legacy REST `POST /inference` on one keep-alive connection per client.

Each phase runs its clients as asyncio tasks in a fresh client process, counts answers after a
1 s warm-up; the phases run in two rounds, the second in reverse order, so that no front
always meets the node first. The goal
(issue 16): gRPC at >= 0.8x the HTTP front's req/s with a p99 no worse.

Prints a table (with the CPU microseconds per answered request that the node and its worker,
and the client process, used over each counted window); `--json` adds one JSON object as the last line: rps, p99_ms and p50_ms (each
per front), ratio_vs_http (per front), errors, goal_met.

    .venv/bin/python bench/grpc_load.py --quick --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# The repository root and bench/, so `transports` and the sibling benches import.
ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from http_load import Phase, merge, note  # noqa: E402
from zmq_load import (  # noqa: E402
    MODEL,
    cpu_seconds,
    free_port,
    legacy_request,
    start_node,
    stop_node,
    worker_pids,
    write_config,
)

FRONTS = ("http", "grpc", "zmq")
PAYLOAD = {"model_name": MODEL, "input_text": "hello", "max_tokens": 1}
WARMUP_S = 1.0
START_S = 3.0  # time for the client process to start and import its client library

Send = Callable[[], Awaitable[bool]]
"""One request: True when answered with a result."""


# ---- one client per front: connect, then send the 1-token infer ----


async def grpc_client(target: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import grpc

    from transports.grpc_gen import modelops_pb2 as pb
    from transports.grpc_gen import modelops_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.ModelOpsStub(channel)
    request = pb.InferenceRequest(**PAYLOAD)

    async def send() -> bool:
        reply = await stub.Infer(request, timeout=60)
        return bool(reply.success and reply.tokens_generated == 1)

    return send, channel.close


async def zmq_client(target: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(target)
    count = 0

    async def send() -> bool:
        nonlocal count
        count += 1
        await sock.send_json(legacy_request("infer", MODEL, str(count)))
        reply = await asyncio.wait_for(sock.recv_json(), 60)
        return isinstance(reply, dict) and reply.get("success") is True

    async def close() -> None:
        sock.close()

    return send, close


async def http_client(target: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=60)
    )

    async def send() -> bool:
        async with session.post(f"{target}/inference", json=PAYLOAD) as resp:
            body = await resp.json()
            return resp.status == 200 and body.get("tokens_generated") == 1

    return send, session.close


CLIENTS = {"grpc": grpc_client, "zmq": zmq_client, "http": http_client}


async def drive(front: str, target: str, clients: int, begin: float, end: float) -> Phase:
    """Run `clients` back-to-back loops through `front` until `end`; count from `begin`."""
    phase = Phase(front, seconds=end - begin)
    opened = [await CLIENTS[front](target) for _ in range(clients)]

    async def loop(send: Send) -> None:
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                ok = await send()
            except Exception as exc:  # a refusal or a reset: counted, never fatal
                ok = False
                note(phase, f"{type(exc).__name__}: {str(exc)[:160]}")
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            if begin <= time.time() < end:
                if ok:
                    phase.latencies_ms.append(elapsed_ms)
                else:
                    phase.silent += 1

    try:
        await asyncio.gather(*(loop(send) for send, _ in opened))
    finally:
        for _, close in opened:
            await close()
    return phase


def _client_process(args: tuple[Any, ...], out: Any) -> None:
    out.put(asyncio.run(drive(*args)))


def run_phase(
    front: str, target: str, clients: int, seconds: float, servers: list[int]
) -> tuple[Phase, dict[str, float]]:
    """Run one front's clients in a fresh process for `seconds` after the warm-up; return the
    phase and the CPU seconds the `servers` (node, worker) and the client process used then."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    begin = time.time() + START_S + WARMUP_S
    proc = ctx.Process(
        target=_client_process, args=((front, target, clients, begin, begin + seconds), out)
    )
    proc.start()
    assert proc.pid is not None
    pids = {"server": servers, "client": [proc.pid]}

    def used() -> dict[str, float]:
        return {role: sum(cpu_seconds(pid) for pid in found) for role, found in pids.items()}

    try:
        # CPU over the counted window only: sampled at its start and at its end.
        time.sleep(max(0.0, begin - time.time()))
        before = used()
        time.sleep(max(0.0, begin + seconds - time.time()))
        after = used()
        phase: Phase = out.get(timeout=300)
    finally:
        proc.join(timeout=30)
    return phase, {role: after[role] - before[role] for role in pids}


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="two rounds of 3 s phases")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, help="length of each phase")
    parser.add_argument("--rounds", type=int, help="rounds of the three phases (default 2)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (3.0 if args.quick else 15.0)
    rounds = args.rounds or 2  # the second in reverse order: no front always goes first

    parts: dict[str, list[Phase]] = {front: [] for front in FRONTS}
    cpu: dict[str, dict[str, float]] = {f: {"server": 0.0, "client": 0.0} for f in FRONTS}
    with tempfile.TemporaryDirectory(prefix="moc-bench-grpc-") as tmp:
        workdir = Path(tmp)
        zmq_port, rest_port, grpc_port = free_port(), free_port(), free_port()
        config = write_config(workdir, zmq_port, rest_port, grpc_port)
        proc = start_node(config, rest_port, workdir / "node.log")
        targets = {
            "grpc": f"127.0.0.1:{grpc_port}",
            "zmq": f"tcp://127.0.0.1:{zmq_port}",
            "http": f"http://127.0.0.1:{rest_port}",
        }
        try:
            for r in range(rounds):
                order = FRONTS if r % 2 == 0 else tuple(reversed(FRONTS))
                for front in order:
                    servers = [proc.pid, *worker_pids(proc.pid)]
                    phase, used = run_phase(front, targets[front], args.clients, seconds, servers)
                    parts[front].append(phase)
                    for role, value in used.items():
                        cpu[front][role] += value
        finally:
            stop_node(proc)

    phases = {front: merge(found) for front, found in parts.items()}
    http = phases["http"]
    ratio = {f: (p.rps / http.rps if http.rps else None) for f, p in phases.items()}
    print(
        f"grpc_load: 1-token legacy infer, {args.clients} concurrent clients per front, "
        f"{rounds} round(s) of {seconds:g} s per front, one node, {os.cpu_count()} CPUs"
    )
    print(
        f"{'front':<8}{'ok':>9}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'vs http':>9}{'node us':>9}{'client us':>11}"
    )
    for front, p in phases.items():
        vs = ratio[front]
        # CPU per answered request, over the counted window.
        per = {role: s * 1e6 / p.ok if p.ok else float("nan") for role, s in cpu[front].items()}
        print(
            f"{front:<8}{p.ok:>9}{p.silent:>8}{p.rps:>10.0f}{p.pct(0.5):>9.2f}"
            f"{p.pct(0.99):>9.2f}{'' if vs is None else f'{vs:.3f}':>9}"
            f"{per['server']:>9.0f}{per['client']:>11.0f}"
        )
        for example in p.examples:
            print(f"  {front} error: {example}")
    grpc = phases["grpc"]
    goal = bool(http.rps) and grpc.rps >= 0.8 * http.rps and grpc.pct(0.99) <= http.pct(0.99)
    print(f"goal (gRPC >= 0.8x HTTP req/s, p99 no worse): {'met' if goal else 'NOT met'}")
    if args.json:
        figures = {
            "rps": {f: round(p.rps, 1) for f, p in phases.items()},
            "ratio_vs_http": {f: None if v is None else round(v, 3) for f, v in ratio.items()},
            "p99_ms": {f: round(p.pct(0.99), 3) for f, p in phases.items()},
            "p50_ms": {f: round(p.pct(0.5), 3) for f, p in phases.items()},
            "errors": {f: p.silent for f, p in phases.items()},
            "clients": args.clients,
            "seconds": seconds,
            "rounds": rounds,
            "goal_met": goal,
        }
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
