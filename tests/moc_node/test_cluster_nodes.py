"""Three real node processes on loopback form one cluster and route requests to each other."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.gguf_synth import write_preset

NAMES = ("node-a", "node-b", "node-c")
KEY = "6d6f632d6e6f64652d746573742d6b65792d3332"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class NodeProc:
    name: str
    http: int
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ValueError):
            pass  # not up yet
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling a condition with a deadline


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, NodeProc]]:
    models = tmp_path / "models"
    models.mkdir()
    write_preset(models / "m.gguf", "tiny")
    key_file = tmp_path / "cluster.key"
    key_file.write_text(KEY + "\n")
    gossip, peer, http, zmq = (free_ports(3) for _ in range(4))
    seeds = json.dumps([f"127.0.0.1:{p}" for p in gossip])
    nodes: dict[str, NodeProc] = {}
    for i, name in enumerate(NAMES):
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f"""
[node]
name = "{name}"
state_dir = "{tmp_path / name}"
model_dirs = ["{models}"]
[server]
rest_port = {http[i]}
zmq_port = {zmq[i]}
[resources]
devices = "cpu"
[[models.catalog]]
name = "m"
path = "{models / 'm.gguf'}"
n_ctx = 128
[cluster]
enabled = true
profile = "local"
bind = "127.0.0.1:{gossip[i]}"
peer_port = {peer[i]}
seeds = {seeds}
voters = {json.dumps(list(NAMES))}
key_file = "{key_file}"
"""
        )
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        nodes[name] = NodeProc(name, http[i], proc, log)
    try:
        for node in nodes.values():
            wait_until(lambda n=node: n.get("/ready")["ready"], 60, f"{node.name} ready")  # type: ignore[misc]
        yield nodes
    finally:
        for node in nodes.values():
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in nodes.values():
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()


def alive(view: dict[str, Any]) -> set[str]:
    return {m["name"] for m in view["members"] if m["state"] == "alive"}


def holders(nodes: dict[str, NodeProc], model: str) -> set[str]:
    found = set()
    for node in nodes.values():
        if node.proc.poll() is None:
            states = {m["name"]: m["state"] for m in node.get("/models")["models"]}
            if states.get(model) == "loaded":
                found.add(node.name)
    return found


def complete(node: NodeProc, model: str = "m") -> tuple[int, Any]:
    return node.post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4})


def test_three_nodes_elect_one_primary_and_place_a_model_once(cluster: dict[str, NodeProc]) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(lambda: all(alive(n.get("/cluster")) == set(NAMES) for n in (a, b, c)), 30, "3 alive members")
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in (a, b, c)), 30, "a primary")
    primaries = {n.get("/cluster")["primary"]["name"] for n in (a, b, c)}
    assert len(primaries) == 1

    status, body = complete(b)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4
    assert len(holders(cluster, "m")) == 1  # one load cluster-wide, whoever asked

    for node in (a, b, c):  # every node serves it: locally or forwarded to the holder
        status, body = complete(node)
        assert status == 200, body
    assert len(holders(cluster, "m")) == 1

    (holder,) = holders(cluster, "m")
    wait_until(lambda: all(n.get("/cluster")["models"].get("m") == [holder] for n in (a, b, c)), 10, "gossiped holder")


def test_when_the_holder_dies_the_model_is_placed_again_elsewhere(cluster: dict[str, NodeProc]) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(lambda: all(n.get("/cluster")["primary"] for n in (a, b, c)), 30, "a primary")
    status, _ = complete(a)
    assert status == 200
    (holder,) = holders(cluster, "m")
    cluster[holder].proc.kill()
    cluster[holder].proc.wait()
    survivors = [n for n in (a, b, c) if n.name != holder]
    wait_until(lambda: all(holder not in alive(n.get("/cluster")) for n in survivors), 30, "death detected")
    wait_until(lambda: complete(survivors[0])[0] == 200, 30, "served again")
    assert len(holders(cluster, "m")) == 1
    assert holder not in holders(cluster, "m")
