"""Soak a real `moc-node run` process with mixed requests; look for leaks it would show in a week.

One node process serves a generated tiny GGUF on free loopback ports. A few client processes
send the mix (ZeroMQ health / list_models / infer with max_tokens=1, an infer for a model name
never sent before, HTTP /v1/completions with max_tokens=1), first a warm-up, then the measured run. The node is sampled from /proc when the
warm-up is done and again when the run is done, both times with every client connected and idle:
RSS (the node plus its worker processes), open file descriptors, threads, child processes. After
SIGTERM, no worker process may outlive the node.

Goals: RSS growth <= 5%, no growth in fds or threads, no worker process leaked or restarted.

Prints a table and the RSS growth of the model worker and of the node process in bytes per
request (a creep of a few bytes per request hides in the percentage; the node's is also given
over the second half of the run, where growth that levels off has stopped and a leak has not);
`--json` adds one JSON object as the last line: requests, errors, rss_growth_pct, fd_growth,
thread_growth, worker_processes_leaked, worker_bytes_per_request, node_bytes_per_request,
node_bytes_per_request_second_half (and the raw samples). `--seeded` gives every HTTP completion a new
seed, so each one builds a sampler chain in the worker and evicts one. Targets 127.0.0.1 only.

    .venv/bin/python bench/soak.py --quick --json     # ~10,000 requests, under two minutes
    .venv/bin/python bench/soak.py --json             # 200,000 requests
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The repository root, so `actors` imports without an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The node under test is started exactly as the ZMQ load bench starts it.
from zmq_load import MODEL, legacy_request, start_node, write_config  # noqa: E402

MIX: tuple[tuple[str, float], ...] = (
    ("zmq:health", 0.25),
    ("zmq:list_models", 0.15),
    ("zmq:infer", 0.25),
    # A refusal, for a name never sent before: neither the error path nor the names may leak.
    ("zmq:unknown_model", 0.05),
    ("http:completions", 0.20),
    ("http:stream", 0.10),  # server-sent events to [DONE]
)
GOALS = {"rss_growth_pct": 5.0, "fd_growth": 0, "thread_growth": 0, "worker_processes_leaked": 0}
REPLY_TIMEOUT_S = 30.0


# ---- /proc sampling ----


@dataclass
class Sample:
    """The node process tree at one moment."""

    label: str
    requests_done: int
    rss_mb: float  # the node and all its descendants
    node_rss_mb: float
    fds: int  # the node process's own descriptors
    threads: int
    children: list[int]  # descendant pids (the model workers)
    workers_rss_kb: int  # the descendants alone, in KiB (a creep of bytes per request shows)


def _status_fields(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_kb(pid: int) -> int:
    """Return the resident set size of one process in KiB (0 once it is gone)."""
    try:
        return int(_status_fields(pid).get("VmRSS", "0 kB").split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def descendants(pid: int) -> list[int]:
    """Return every live descendant of `pid` (children, grandchildren, ...), zombies excluded."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            parents.setdefault(int(ppid), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def alive(pid: int) -> bool:
    """Tell whether `pid` exists and is not a zombie."""
    try:
        return _status_fields(pid).get("State", "Z").split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def sample(pid: int, label: str, requests_done: int) -> Sample:
    """Measure the node process tree now."""
    children = descendants(pid)
    node_kb = rss_kb(pid)
    workers_kb = sum(rss_kb(c) for c in children)
    total_kb = node_kb + workers_kb
    return Sample(
        label=label,
        requests_done=requests_done,
        rss_mb=total_kb / 1024.0,
        node_rss_mb=node_kb / 1024.0,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(_status_fields(pid)["Threads"]),
        children=children,
        workers_rss_kb=workers_kb,
    )


# ---- the clients ----


def client(
    seed: int,
    zmq_endpoint: str,
    http_port: int,
    warmup: int,
    count: int,
    reconnect_every: int,
    seeded: bool,
    warmed: Any,
    go: Any,
    finished: Any,
    leave: Any,
    done: Any,
    out: Any,
) -> None:
    """Send `warmup` then `count` requests of the mix, waiting for the signal in between."""
    import zmq

    rng = random.Random(seed)
    ctx = zmq.Context()
    sent = 0
    names = [name for name, _ in MIX]
    weights = [w for _, w in MIX]
    state: dict[str, Any] = {"sock": None, "conn": None}

    def zmq_socket() -> Any:
        if state["sock"] is None:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
            sock.connect(zmq_endpoint)
            state["sock"] = sock
        return state["sock"]

    def http_conn() -> http.client.HTTPConnection:
        if state["conn"] is None:
            state["conn"] = http.client.HTTPConnection(
                "127.0.0.1", http_port, timeout=REPLY_TIMEOUT_S
            )
        conn: http.client.HTTPConnection = state["conn"]
        return conn

    def reconnect() -> None:
        if state["sock"] is not None:
            state["sock"].close(0)
        if state["conn"] is not None:
            state["conn"].close()
        state["sock"] = state["conn"] = None

    def one(i: int) -> bool:
        nonlocal sent
        sent += 1
        if reconnect_every and sent % reconnect_every == 0:
            reconnect()  # connection setup and teardown must not leak either
        kind = rng.choices(names, weights)[0]
        if kind.startswith("zmq:"):
            action = "infer" if kind.endswith(("infer", "unknown_model")) else kind[4:]
            model = f"no-such-model-{seed}-{i}" if kind.endswith("unknown_model") else MODEL
            sock = zmq_socket()
            sock.send_json(legacy_request(action, model, f"{seed}-{i}"))
            try:
                reply = sock.recv_json()
            except zmq.Again:
                # A REQ socket without its reply cannot go on: start a new one.
                sock.close(0)
                state["sock"] = None
                return False
            if not isinstance(reply, dict):
                return False
            if kind.endswith("unknown_model"):
                return (
                    reply.get("success") is False and reply.get("error_code") == "model_not_found"
                )
            return reply.get("success") is True
        stream = kind == "http:stream"
        fields: dict[str, Any] = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
        if seeded:  # a seed never seen before: the worker builds a sampler chain, evicts one
            fields["seed"] = seed * 1_000_000_000 + i
        body = json.dumps({**fields, "stream": stream})
        try:
            conn = http_conn()
            conn.request(
                "POST", "/v1/completions", body, headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            if state["conn"] is not None:
                state["conn"].close()
            state["conn"] = None
            return False
        if stream:
            return response.status == 200 and data.endswith(b"data: [DONE]\n\n")
        return response.status == 200 and b'"choices"' in data

    ok = errors = 0
    for i in range(warmup):
        one(i)
    warmed.release()
    go.wait()
    t0 = time.perf_counter()
    for i in range(count):
        if one(warmup + i):
            ok += 1
        else:
            errors += 1
        if i % 100 == 99:
            with done.get_lock():
                done.value += 100
    seconds = time.perf_counter() - t0
    with done.get_lock():
        done.value += count % 100
    out.put((ok, errors, seconds))
    finished.release()
    leave.wait()  # stay connected until the end sample is taken: fds compare like for like
    if state["sock"] is not None:
        state["sock"].close(0)
    if state["conn"] is not None:
        state["conn"].close()
    ctx.term()


# ---- the node ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_node(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM the node and wait for it; kill it if it does not stop. Return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def settle(pid: int, seconds: float = 2.0) -> None:
    """Give the node a moment to finish replies and let idle threads exit before sampling."""
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        now = (_status_fields(pid)["Threads"], len(os.listdir(f"/proc/{pid}/fd")))
        if now == last:
            return
        last = now
        time.sleep(0.5)


# ---- main ----


def growth_pct(start: float, end: float) -> float:
    return (end - start) / start * 100.0 if start else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, help="requests in the measured run")
    parser.add_argument("--quick", action="store_true", help="10,000 requests (under two minutes)")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--warmup", type=int, help="warm-up requests (default: 10%%, >= 500)")
    parser.add_argument(
        "--reconnect-every",
        type=int,
        default=100,
        help="each client opens new connections every this many requests (0: never)",
    )
    parser.add_argument(
        "--seeded",
        action="store_true",
        help="each HTTP completion carries a new seed (every one misses the sampler cache)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    total = args.requests or (10_000 if args.quick else 200_000)
    warmup = args.warmup if args.warmup is not None else max(500, total // 10)
    clients = max(1, args.clients)

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="moc-soak-") as tmp:
        workdir = Path(tmp)
        zmq_port, rest_port = free_port(), free_port()
        config = write_config(workdir, zmq_port, rest_port)
        proc = start_node(config, rest_port, workdir / "node.log")
        warmed, finished = ctx.Semaphore(0), ctx.Semaphore(0)
        go, leave = ctx.Event(), ctx.Event()
        done = ctx.Value("q", 0)
        out = ctx.Queue()
        shares = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
        procs = [
            ctx.Process(
                target=client,
                args=(
                    i,
                    f"tcp://127.0.0.1:{zmq_port}",
                    rest_port,
                    warmup // clients,
                    shares[i],
                    args.reconnect_every,
                    args.seeded,
                    warmed,
                    go,
                    finished,
                    leave,
                    done,
                    out,
                ),
            )
            for i in range(clients)
        ]
        samples: list[Sample] = []
        results: list[tuple[int, int, float]] = []
        exit_code: int | None = None
        survivors: list[int] = []
        try:
            for p in procs:
                p.start()
            for _ in procs:
                if not warmed.acquire(timeout=600):
                    raise RuntimeError("a client did not finish its warm-up")
            settle(proc.pid)
            samples.append(sample(proc.pid, "start (after warm-up)", 0))
            t0 = time.monotonic()
            go.set()
            remaining = len(procs)
            next_sample = t0 + 10.0
            while remaining:
                if finished.acquire(timeout=0.5):
                    remaining -= 1
                if time.monotonic() >= next_sample and remaining:
                    samples.append(sample(proc.pid, "during", done.value))
                    next_sample += 10.0
                if proc.poll() is not None:
                    raise RuntimeError(f"the node exited during the run ({proc.returncode})")
            elapsed = time.monotonic() - t0
            results = [out.get(timeout=60) for _ in procs]
            settle(proc.pid)
            samples.append(sample(proc.pid, "end (clients idle)", done.value))
        finally:
            leave.set()
            go.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            workers = set(samples[0].children) | set(samples[-1].children) if samples else set()
            exit_code = stop_node(proc)
            survivors = sorted(pid for pid in workers if alive(pid))

    start, end = samples[0], samples[-1]
    ok = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    requests = ok + errors
    leaked = len(set(end.children) - set(start.children)) + len(survivors)
    worker_growth_kb = end.workers_rss_kb - start.workers_rss_kb
    node_growth_kb = round((end.node_rss_mb - start.node_rss_mb) * 1024)
    # From the sample nearest half-way: growth that levels off (allocator, bounded caches) is
    # mostly in the first half; a leak grows as much in the second.
    during = samples[1:-1]
    mid = min(during, key=lambda s: abs(s.requests_done - end.requests_done / 2), default=end)
    half_requests = end.requests_done - mid.requests_done  # 0 when no sample was taken during
    figures: dict[str, Any] = {
        "requests": requests,
        "errors": errors,
        "rss_growth_pct": round(growth_pct(start.rss_mb, end.rss_mb), 2),
        "fd_growth": end.fds - start.fds,
        "thread_growth": end.threads - start.threads,
        "worker_processes_leaked": leaked,
        "workers_restarted": len(set(start.children) - set(end.children)),
        "workers_alive_after_exit": survivors,
        "node_exit_code": exit_code,
        "worker_rss_growth_kb": worker_growth_kb,
        "worker_bytes_per_request": round(worker_growth_kb * 1024 / requests, 1)
        if requests
        else None,
        "node_rss_growth_kb": node_growth_kb,
        "node_bytes_per_request": round(node_growth_kb * 1024 / requests, 1) if requests else None,
        "node_bytes_per_request_second_half": round(
            (end.node_rss_mb - mid.node_rss_mb) * 1024 * 1024 / half_requests, 1
        )
        if half_requests > 0
        else None,
        "rss_start_mb": round(start.rss_mb, 1),
        "rss_end_mb": round(end.rss_mb, 1),
        "rps": round(requests / elapsed, 1) if elapsed else None,
        "seconds": round(elapsed, 1),
        "clients": clients,
        "warmup": warmup,
        "samples": [asdict(s) for s in samples],
    }

    print(
        f"soak: {requests} requests ({warmup} warm-up before), {clients} client processes, "
        f"mix {' / '.join(f'{w:.0%} {a}' for a, w in MIX)} (max_tokens=1), "
        f"new connections every {args.reconnect_every or 'never'} requests, "
        f"{'a new seed per HTTP request, ' if args.seeded else ''}"
        f"{os.cpu_count()} CPUs, {elapsed:.1f} s, {figures['rps']} req/s, {errors} errors"
    )
    print(
        f"{'sample':<24}{'requests':>9}{'RSS MiB':>9}{'node MiB':>9}{'fds':>6}{'threads':>8}"
        f"{'workers':>8}"
    )
    for s in samples:
        print(
            f"{s.label:<24}{s.requests_done:>9}{s.rss_mb:>9.1f}{s.node_rss_mb:>9.1f}{s.fds:>6}"
            f"{s.threads:>8}{len(s.children):>8}"
        )
    print(
        f"worker RSS {start.workers_rss_kb:,} -> {end.workers_rss_kb:,} KiB "
        f"({worker_growth_kb:+,} KiB, {figures['worker_bytes_per_request']} bytes per request)"
    )
    print(
        f"node RSS {start.node_rss_mb * 1024:,.0f} -> {end.node_rss_mb * 1024:,.0f} KiB "
        f"({node_growth_kb:+,} KiB, {figures['node_bytes_per_request']} bytes per request; "
        f"second half {figures['node_bytes_per_request_second_half']} bytes per request)"
    )
    verdicts = {
        "rss_growth_pct": figures["rss_growth_pct"] <= GOALS["rss_growth_pct"],
        "fd_growth": figures["fd_growth"] <= GOALS["fd_growth"],
        "thread_growth": figures["thread_growth"] <= GOALS["thread_growth"],
        "worker_processes_leaked": leaked <= GOALS["worker_processes_leaked"],
    }
    for key, passed in verdicts.items():
        print(
            f"{key:<26}{figures[key]!s:>10}  goal <= {GOALS[key]}  {'ok' if passed else 'MISSED'}"
        )
    print(f"node exit code after SIGTERM: {exit_code}; workers alive after exit: {survivors}")
    if args.json:
        print(json.dumps(figures))
    return 0 if all(verdicts.values()) and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
