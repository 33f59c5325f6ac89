"""The real `moc-node run` process: readiness, SIGHUP reload, SIGTERM drain, kill -9 and restart.

Each test starts the program as a subprocess on free loopback ports, with its state in a temporary
directory and a catalog of generated tiny models, and talks to it over HTTP as any client would.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import wait_until

READY_TIMEOUT = 120.0  # a cold interpreter importing llama.cpp on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Tell whether `pid` runs (a zombie, dead but not reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def is_worker(pid: int) -> bool:
    """Tell whether `pid` is still a model worker (pids are reused)."""
    try:
        return b"actors.worker.main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False




@dataclass
class Catalog:
    """One `[[models.catalog]]` entry."""

    name: str
    path: Path
    preload: bool = False
    n_ctx: int = 256


@dataclass
class NodeProcess:
    """One `moc-node run` subprocess and the files around it."""

    proc: subprocess.Popen[bytes]
    rest_port: int
    log_path: Path
    pids_seen: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 60
    ) -> tuple[int, Any]:
        """Send one request; return the status and the decoded JSON body."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def status_of(self, path: str) -> int | None:
        """GET `path` and return its status, or None while nothing listens."""
        try:
            return self.call("GET", path, timeout=5)[0]
        except (OSError, ValueError):
            return None

    def models(self) -> dict[str, dict[str, Any]]:
        status, body = self.call("GET", "/models")
        assert status == 200, body
        return {m["name"]: m for m in body["models"]}

    def infer(self, model: str, max_tokens: int = 4) -> dict[str, Any]:
        payload = {"model_name": model, "input_text": "hello", "max_tokens": max_tokens}
        status, body = self.call("POST", "/inference", payload)
        assert status == 200, body
        return dict(body)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll /ready until it answers 200; fail with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while self.status_of("/ready") != 200:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"node not ready in {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)  # polling a condition with a deadline

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


Spawn = Callable[..., NodeProcess]


def write_config(
    path: Path, state_dir: Path, model_dir: Path, rest_port: int, zmq_port: int, *models: Catalog
) -> Path:
    """Write a TOML config serving `models` on loopback."""
    entries = "".join(
        f"""
[[models.catalog]]
name = "{m.name}"
path = "{m.path}"
n_ctx = {m.n_ctx}
preload = {str(m.preload).lower()}
"""
        for m in models
    )
    path.write_text(
        f"""
[node]
name = "proc-test"
state_dir = "{state_dir}"
model_dirs = ["{model_dir}"]
drain_timeout = 60

[server]
host = "127.0.0.1"
rest_port = {rest_port}
zmq_port = {zmq_port}
grpc_port = 0

[resources]
devices = "cpu"
{entries}""",
        encoding="utf-8",
    )
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any MOC_ override from the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOC_")}
    env.update(extra)
    return env


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `moc-node run` processes; kill any still running at teardown."""
    started: list[NodeProcess] = []

    def start(
        args: list[str],
        rest_port: int,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        log_path = tmp_path / f"node-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd or tmp_path,
                env=env or clean_env(),
            )
        node = NodeProcess(proc, rest_port, log_path)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(timeout=30)
        for pid in node.pids_seen:  # a worker the test left behind must not outlive it
            if pid_alive(pid) and is_worker(pid):
                os.kill(pid, signal.SIGKILL)


def run_args(config: Path) -> list[str]:
    return [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)]


def worker_pids(node: NodeProcess) -> dict[str, int]:
    pids = {name: m["pid"] for name, m in node.models().items() if m.get("pid")}
    node.pids_seen.extend(pids.values())
    return pids


def test_the_process_becomes_ready_serves_and_reloads_its_catalog_on_sighup(
    spawn: Spawn, tmp_path: Path, model_root: Path
) -> None:
    model_dir = model_root  # the conftest's copy of the generated tiny models
    rest, zmq_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    a = Catalog("a", model_dir / "a.gguf", preload=True)
    write_config(config, tmp_path / "state", model_dir, rest, zmq_port, a)
    node = spawn(run_args(config), rest)
    node.wait_ready()
    assert node.infer("a")["tokens_generated"] == 4
    assert node.models()["a"]["state"] == "loaded"
    worker_pids(node)

    write_config(
        config, tmp_path / "state", model_dir, rest, zmq_port, a, Catalog("b", model_dir / "b.gguf")
    )
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "b" in node.models(), 30, "model b in the catalog after SIGHUP")
    assert node.infer("b")["tokens_generated"] == 4  # a cold catalog model loads on first use
    worker_pids(node)

    # A broken edit (n_ctx out of range) is refused; the node keeps its catalog and serves on.
    good = config.read_text()
    config.write_text(good.replace("n_ctx = 256", "n_ctx = 1", 1))
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in node.log(), 30, "the broken reload logged")
    assert "n_ctx" in node.log()
    assert node.proc.poll() is None
    assert set(node.models()) == {"a", "b"}
    assert node.infer("a")["tokens_generated"] == 4
    assert node.status_of("/ready") == 200


def test_sigterm_lets_the_stream_in_flight_finish_while_not_ready_then_exits_zero(
    spawn: Spawn, tmp_path: Path, model_root: Path
) -> None:
    model_dir = model_root  # the conftest's copy of the generated tiny models
    rest, zmq_port = free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml",
        tmp_path / "state",
        model_dir,
        rest,
        zmq_port,
        Catalog("a", model_dir / "a.gguf", preload=True, n_ctx=2048),
    )
    node = spawn(run_args(config), rest)
    node.wait_ready()
    pids = worker_pids(node)
    assert set(pids) == {"a"} and pid_alive(pids["a"])

    conn = http.client.HTTPConnection("127.0.0.1", rest, timeout=60)
    body = {"model": "a", "prompt": "go", "max_tokens": 1500, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events: list[bytes] = []
    while not events:  # the stream is under way
        line = resp.readline().strip()
        if line.startswith(b"data: "):
            events.append(line[6:])

    node.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: node.status_of("/ready") == 503, 30, "/ready answering 503 while draining")
    status, refused = node.call(
        "POST", "/inference", {"model_name": "a", "input_text": "late", "max_tokens": 2}
    )
    assert status == 503 and refused["code"] == "shutting_down"

    while True:
        raw = resp.readline()
        if not raw:
            break
        line = raw.strip()
        if line.startswith(b"data: "):
            events.append(line[6:])
    conn.close()
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert node.proc.wait(timeout=90) == 0, node.log()
    wait_until(lambda: not pid_alive(pids["a"]), 10, "the worker process gone")


def test_after_kill_9_a_restart_restores_the_loaded_set_before_it_is_ready(
    spawn: Spawn, tmp_path: Path, model_root: Path
) -> None:
    model_dir = model_root  # the conftest's copy of the generated tiny models
    state = tmp_path / "state"
    rest, zmq_port = free_port(), free_port()
    catalog = Catalog("a", model_dir / "a.gguf")
    config = write_config(tmp_path / "node.toml", state, model_dir, rest, zmq_port, catalog)
    node = spawn(run_args(config), rest)
    node.wait_ready()
    assert {m["state"] for m in node.models().values()} == {"available"}
    # Loaded by path, not in the catalog: only the state store can bring it back.
    status, loaded = node.call(
        "POST", "/models", {"model_name": "x", "model_path": str(model_dir / "b.gguf")}
    )
    assert status == 201, loaded
    old_pid = worker_pids(node)["x"]

    node.proc.kill()
    node.proc.wait(timeout=30)
    wait_until(lambda: not pid_alive(old_pid), 15, "the orphaned worker ending itself")

    rest, zmq_port = free_port(), free_port()
    write_config(tmp_path / "node.toml", state, model_dir, rest, zmq_port, catalog)
    again = spawn(run_args(config), rest)
    # Readiness only after the restore: once /ready says 200, x is already loaded.
    again.wait_ready()
    restored = again.models()
    assert restored["x"]["state"] == "loaded"
    assert restored["a"]["state"] == "available"
    assert restored["x"]["pid"] != old_pid
    worker_pids(again)
    assert again.infer("x")["tokens_generated"] == 4
    again.proc.send_signal(signal.SIGTERM)
    assert again.proc.wait(timeout=60) == 0, again.log()


def test_with_no_config_at_all_the_node_generates_and_serves_a_demo_model(
    spawn: Spawn, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    rest = free_port()
    script = Path(sys.executable).with_name("moc-node")
    args = (
        [str(script), "run"] if script.exists() else [sys.executable, "-m", "moc_node.cli", "run"]
    )
    # Only the ports come from the environment, so the test cannot collide with a real node.
    env = clean_env(MOC_SERVER__REST_PORT=str(rest), MOC_SERVER__ZMQ_PORT=str(free_port()))
    node = spawn(args, rest, cwd=fresh, env=env)
    node.wait_ready()
    assert (fresh / ".state" / "models" / "demo.gguf").is_file()
    assert node.models()["demo"]["state"] == "loaded"
    worker_pids(node)
    assert node.infer("demo", max_tokens=8)["tokens_generated"] == 8
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=60) == 0, node.log()
