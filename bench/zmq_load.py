"""Load the legacy ZeroMQ front with many REQ client processes; compare with a bare echo server.

Two phases in one run, same clients, same machine:

1. anchor: a bare pyzmq ROUTER that decodes each JSON request and sends a JSON reply (no node);
2. node: a real `moc-node run` process serving a generated tiny GGUF; the request mix is 40%
   health, 20% list_models, 40% infer with max_tokens=1.

Prints a table; `--json` adds one JSON object as the last line: rps, p99_ms, echo_rps,
ratio_vs_echo (plus p50s and error counts). Targets 127.0.0.1 only.

    .venv/bin/python bench/zmq_load.py --quick --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The repository root, so `actors` imports without an installed package.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "tiny"
MIX: tuple[tuple[str, float], ...] = (("health", 0.4), ("list_models", 0.2), ("infer", 0.4))


def percentile(values: list[float], q: float) -> float:
    """Return the q-quantile of `values` (nearest rank), NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Phase:
    """What one phase measured; `cpu_s` is CPU seconds used during it, by role."""

    name: str
    ok: int
    errors: int
    seconds: float
    by_action: dict[str, list[float]]
    cpu_s: dict[str, float]

    @property
    def latencies_ms(self) -> list[float]:
        return [x for values in self.by_action.values() for x in values]

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


# ---- CPU accounting from /proc (Linux) ----

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces; fields follow it
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def child_pids(pid: int) -> list[int]:
    """Return the direct children of `pid` (every thread's list), empty once it is gone."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the anchor: a bare pyzmq ROUTER JSON echo ----


def echo_server(port: int, ready: Any) -> None:
    """Answer each JSON request with a JSON reply carrying it back (runs in its own process)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    while True:
        frames = sock.recv_multipart()
        request = json.loads(frames[-1])
        reply = {
            "success": True,
            "result": request.get("payload"),
            "error": None,
            "request_id": request.get("request_id"),
            "latency_ms": 0.0,
        }
        sock.send_multipart([*frames[:-1], json.dumps(reply).encode()])


# ---- the clients ----


def legacy_request(action: str, model: str, request_id: str) -> dict[str, Any]:
    """One request as the legacy agents send it (an infer asks for one token)."""
    payload = (
        {"model_name": model, "input_text": "hello", "max_tokens": 1} if action == "infer" else {}
    )
    return {
        "action": action,
        "payload": payload,
        "request_id": request_id,
        "timestamp": "2024-01-01T00:00:00Z",
    }


def client(
    endpoint: str,
    seed: int,
    mix: tuple[tuple[str, float], ...],
    nice: int,
    ready: Any,
    go: Any,
    stop_at: Any,
    out: Any,
) -> None:
    """Send the request mix on one REQ socket until the deadline; report latencies and CPU."""
    import resource

    import zmq

    if nice:
        os.nice(nice)
    rng = random.Random(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(endpoint)
    actions = [a for a, _ in mix]
    weights = [w for _, w in mix]
    by_action: dict[str, list[float]] = {a: [] for a in actions}
    ok = errors = 0
    ready.release()
    go.wait()
    deadline = stop_at.value
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    i = 0
    while time.time() < deadline:
        action = rng.choices(actions, weights)[0]
        t0 = time.perf_counter()
        sock.send_json(legacy_request(action, MODEL, f"{seed}-{i}"))
        try:
            reply = sock.recv_json()
        except zmq.Again:
            errors += 1
            break  # a REQ socket without its reply cannot go on
        by_action[action].append((time.perf_counter() - t0) * 1000.0)
        if isinstance(reply, dict) and reply.get("success"):
            ok += 1
        else:
            errors += 1
        i += 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    sock.close()
    ctx.term()
    out.put((ok, errors, by_action, cpu))


def run_phase(
    name: str,
    endpoint: str,
    clients: int,
    seconds: float,
    mix: tuple[tuple[str, float], ...] = MIX,
    *,
    nice: int = 0,
    servers: dict[str, list[int]] | None = None,
) -> Phase:
    """Run `clients` processes against `endpoint` for `seconds`; gather their figures.

    `servers` names the server processes by role; their CPU use over the phase is measured.
    """
    ctx = mp.get_context("spawn")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    stop_at = ctx.Value("d", 0.0)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=client, args=(endpoint, i, mix, nice, ready, go, stop_at, out))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every interpreter has imported zmq and connected
        if not ready.acquire(timeout=120):
            raise RuntimeError("a client process did not start")
    roles = servers or {}
    before = {role: sum(cpu_seconds(pid) for pid in pids) for role, pids in roles.items()}
    start = time.time()
    stop_at.value = start + seconds
    go.set()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    elapsed = time.time() - start
    cpu = {
        role: sum(cpu_seconds(pid) for pid in pids) - before[role] for role, pids in roles.items()
    }
    cpu["clients"] = sum(r[3] for r in results)
    for p in procs:
        p.join(timeout=30)
    ok = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    by_action: dict[str, list[float]] = {a: [] for a, _ in mix}
    for r in results:
        for action, values in r[2].items():
            by_action[action] += values
    return Phase(name, ok, errors, elapsed, by_action, cpu)


# ---- the node ----


def write_config(workdir: Path, zmq_port: int, rest_port: int, grpc_port: int = 0) -> Path:
    """Generate the tiny model and a TOML config serving it on loopback (gRPC: 0, any port)."""
    from actors.gguf_synth import write_preset

    models = workdir / "models"
    models.mkdir()
    path = write_preset(models / f"{MODEL}.gguf", "tiny", seed=1)
    config = workdir / "node.toml"
    config.write_text(
        f"""
[node]
name = "bench"
state_dir = "{workdir / "state"}"
model_dirs = ["{models}"]

[server]
host = "127.0.0.1"
zmq_port = {zmq_port}
rest_port = {rest_port}
grpc_port = {grpc_port}

[resources]
devices = "cpu"

[[models.catalog]]
name = "{MODEL}"
path = "{path}"
n_ctx = 256
preload = true
pin = true
""",
        encoding="utf-8",
    )
    return config


def start_node(
    config: Path, rest_port: int, log_path: Path, timeout: float = 120.0
) -> subprocess.Popen[bytes]:
    """Start `moc-node run` and wait until /ready answers 200; raise with the log tail if not."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moc_node.cli",
            "run",
            "--config",
            str(config),
            "--log-level",
            "WARNING",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop_node(proc)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"node not ready (exit code {proc.returncode}); log tail:\n{tail}")


def stop_node(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- main ----


def worker_pids(node_pid: int) -> list[int]:
    """Return the node's model worker processes (its children running actors.worker.main)."""
    found = []
    for pid in child_pids(node_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"actors.worker.main" in cmdline:
            found.append(pid)
    return found


def print_phase_details(phase: Phase) -> None:
    """Print per-action latencies and where the CPU went during the phase."""
    actions = "  ".join(
        f"{action} p50 {percentile(v, 0.5):.2f} p99 {percentile(v, 0.99):.2f}"
        for action, v in phase.by_action.items()
    )
    print(f"  {phase.name}: {actions} (ms)")
    busy = sum(phase.cpu_s.values())
    split = ", ".join(f"{role} {s / phase.seconds:.2f}" for role, s in phase.cpu_s.items())
    print(f"  {phase.name}: CPU cores busy: {split} (total {busy / phase.seconds:.2f})")
    if phase.ok:
        per = ", ".join(f"{role} {s * 1e6 / phase.ok:.0f}" for role, s in phase.cpu_s.items())
        print(f"  {phase.name}: CPU us per request: {per}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short phases (the whole run under two minutes)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, help="length of each phase")
    parser.add_argument(
        "--mix", help="diagnostics: another request mix, e.g. health:1 or health:0.5,infer:0.5"
    )
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="run the client processes at this nice level in both phases (default 0: the "
        "clients compete with the server for the cores as equals)",
    )
    args = parser.parse_args(argv)
    mix = MIX
    if args.mix:
        mix = tuple((a, float(w)) for a, w in (part.split(":") for part in args.mix.split(",")))
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    nice = args.client_nice

    # The anchor.
    ctx = mp.get_context("spawn")
    echo_port = free_port()
    ready = ctx.Event()
    echo = ctx.Process(target=echo_server, args=(echo_port, ready), daemon=True)
    echo.start()
    ready.wait(30)
    try:
        assert echo.pid is not None
        anchor = run_phase(
            "bare pyzmq ROUTER echo",
            f"tcp://127.0.0.1:{echo_port}",
            args.clients,
            seconds,
            mix,
            nice=nice,
            servers={"server": [echo.pid]},
        )
    finally:
        echo.terminate()
        echo.join()

    # The node.
    node_phase: Phase | None = None
    node_error = ""
    with tempfile.TemporaryDirectory(prefix="moc-bench-") as tmp:
        workdir = Path(tmp)
        zmq_port, rest_port = free_port(), free_port()
        try:
            config = write_config(workdir, zmq_port, rest_port)
            proc = start_node(config, rest_port, workdir / "node.log")
        except Exception as exc:
            node_error = str(exc)
        else:
            try:
                node_phase = run_phase(
                    "moc-node legacy ZMQ",
                    f"tcp://127.0.0.1:{zmq_port}",
                    args.clients,
                    seconds,
                    mix,
                    nice=nice,
                    servers={"node": [proc.pid], "worker": worker_pids(proc.pid)},
                )
            finally:
                stop_node(proc)

    print(
        f"zmq_load: {args.clients} client processes (nice {nice}), {seconds:g} s per phase, "
        f"mix {' / '.join(f'{w:.0%} {a}' for a, w in mix)} (infer: max_tokens=1), "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'phase':<26}{'ok':>9}{'errors':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for phase in (anchor, node_phase):
        if phase is not None:
            print(
                f"{phase.name:<26}{phase.ok:>9}{phase.errors:>8}{phase.rps:>10.0f}"
                f"{phase.pct(0.5):>9.2f}{phase.pct(0.99):>9.2f}"
            )
    for phase in (anchor, node_phase):
        if phase is not None:
            print_phase_details(phase)
    ratio = node_phase.rps / anchor.rps if node_phase and anchor.rps else None
    if node_phase is None:
        print(f"moc-node phase not run: {node_error.splitlines()[0] if node_error else 'unknown'}")
        if node_error:
            print(node_error, file=sys.stderr)
    else:
        print(f"ratio vs echo: {ratio:.3f}")
    if args.json:
        figures: dict[str, Any] = {
            "rps": round(node_phase.rps, 1) if node_phase else None,
            "p99_ms": round(node_phase.pct(0.99), 3) if node_phase else None,
            "p50_ms": round(node_phase.pct(0.5), 3) if node_phase else None,
            "errors": node_phase.errors if node_phase else None,
            "echo_rps": round(anchor.rps, 1),
            "echo_p99_ms": round(anchor.pct(0.99), 3),
            "ratio_vs_echo": round(ratio, 4) if ratio is not None else None,
            "clients": args.clients,
            "client_nice": nice,
            "seconds": seconds,
        }
        if node_phase is not None:
            for action, values in node_phase.by_action.items():
                figures[f"{action}_p99_ms"] = round(percentile(values, 0.99), 3)
            for role, used in node_phase.cpu_s.items():
                figures[f"cpu_{role}"] = round(used / node_phase.seconds, 3)
        print(json.dumps(figures))
    return 0 if node_phase is not None else 1


if __name__ == "__main__":
    sys.exit(main())
