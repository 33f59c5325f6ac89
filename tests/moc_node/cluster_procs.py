"""Real moc-node processes forming a cluster: configs, start, restart, HTTP helpers.

Shared by the loopback cluster tests, the browser test of the cluster page and `bench/chaos.py`.
Every node is a `python -m moc_node.cli run --config FILE` process with `[cluster] enabled = true`
and the `local` (fast) profile, all sharing one key file. A node may run inside a network
namespace (`prefix`, e.g. `ip netns exec NS`) with separate addresses for gossip/peer traffic
and for its HTTP server, so a partition can cut one without the other.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from actors.gguf_synth import write_preset
from tests import support

NAMES = ("node-a", "node-b", "node-c")
KEY = "6d6f632d6e6f64652d746573742d6b65792d3332"


def free_ports(n: int) -> list[int]:
    """Return n distinct ports free on loopback for both UDP and TCP (gossip uses both).

    Picked below the kernel's ephemeral range: a port found free there could be taken by any
    outgoing connection before the node binds it (seen once: "cluster.bind: Address already in
    use"), one below it only by another explicit bind.
    """
    low = _ephemeral_low()
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(max(1024, low - 20000), low)
        if port not in ports and _bindable(port):
            ports.append(port)
    return ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    """True if `port` binds on loopback for UDP and TCP now."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@dataclass
class NodeProc:
    """One node process, restartable with the same config (and so the same state dir)."""

    name: str
    http: int
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path | None = None
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    restarts: int = field(default=0)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http}"

    def running(self) -> bool:
        """Return whether the process has not exited (a stopped one still runs)."""
        return self.proc.poll() is None

    def restart(self) -> None:
        """Start the node again after it exited, appending to the same log."""
        assert self.config is not None and not self.running()
        self.proc = spawn(self.config, self.log, self.prefix)
        self.restarts += 1

    def get(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `check` is true; a check that raises OSError/ValueError counts as false."""

    def holds() -> bool:
        try:
            return check()
        except (OSError, ValueError):
            return False  # not up yet

    support.wait_until(holds, timeout, what)


def spawn(config: Path, log: Path, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start `moc-node run --config config`, output appended to `log`."""
    out: IO[bytes] = log.open("ab")
    try:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    finally:
        out.close()  # the child holds its own copy


@dataclass(frozen=True)
class Addresses:
    """Where one node listens: gossip and peer RPC on `cluster`, HTTP/ZMQ on `server`."""

    cluster: str = "127.0.0.1"
    server: str = "127.0.0.1"
    reach: str = "127.0.0.1"
    """Address clients outside the node use for its HTTP port."""


def node_config(
    root: Path,
    name: str,
    *,
    models: Path,
    key_file: Path,
    ports: Mapping[str, int],
    addresses: Addresses,
    seeds: Sequence[str],
    voters: Sequence[str],
    extra: str = "",
) -> str:
    """Return the TOML of one cluster node serving model `m` from `models/m.gguf`."""
    return f"""
[node]
name = "{name}"
state_dir = "{root / name}"
model_dirs = ["{models}"]
drain_timeout = 5.0
[server]
host = "{addresses.server}"
rest_port = {ports["http"]}
zmq_port = {ports["zmq"]}
grpc_port = 0
[resources]
devices = "cpu"
[[models.catalog]]
name = "m"
path = "{models / "m.gguf"}"
n_ctx = 128
[cluster]
enabled = true
profile = "local"
bind = "{addresses.cluster}:{ports["gossip"]}"
peer_port = {ports["peer"]}
seeds = {json.dumps(list(seeds))}
voters = {json.dumps(list(voters))}
key_file = "{key_file}"
{extra}
"""


@contextmanager
def start_cluster(
    root: Path,
    *,
    names: Sequence[str] = NAMES,
    addresses: Mapping[str, Addresses] | None = None,
    prefixes: Mapping[str, Sequence[str]] | None = None,
    extra: str = "",
    ready_timeout: float = 60,
) -> Iterator[dict[str, NodeProc]]:
    """Start one node per name, wait until each is ready, and stop them all (SIGTERM) after."""
    models = root / "models"
    models.mkdir(exist_ok=True)
    if not (models / "m.gguf").exists():
        write_preset(models / "m.gguf", "tiny")
    key_file = root / "cluster.key"
    key_file.write_text(KEY + "\n")
    where = {n: (addresses or {}).get(n, Addresses()) for n in names}
    count = len(names)
    # One call: ports from separate calls may repeat (each call frees its sockets on return).
    ports = free_ports(4 * count)
    gossip, peer, http, zmq = (ports[i * count : (i + 1) * count] for i in range(4))
    seeds = [f"{where[n].cluster}:{gossip[i]}" for i, n in enumerate(names)]
    nodes: dict[str, NodeProc] = {}
    try:
        for i, name in enumerate(names):
            config = root / f"{name}.toml"
            ports = {"gossip": gossip[i], "peer": peer[i], "http": http[i], "zmq": zmq[i]}
            config.write_text(
                node_config(
                    root,
                    name,
                    models=models,
                    key_file=key_file,
                    ports=ports,
                    addresses=where[name],
                    seeds=seeds,
                    voters=names,
                    extra=extra,
                )
            )
            log = root / f"{name}.log"
            prefix = tuple((prefixes or {}).get(name, ()))
            proc = spawn(config, log, prefix)
            nodes[name] = NodeProc(name, http[i], proc, log, config, where[name].reach, prefix)
        for node in nodes.values():
            wait_ready(node, ready_timeout)
        yield nodes
    finally:
        stop_all(nodes.values())


def wait_ready(node: NodeProc, timeout: float = 60) -> None:
    """Wait until the node's /ready says ready; fail early with its log if it exited."""

    def ready() -> bool:
        if not node.running():
            tail = node.log.read_text(errors="replace")[-2000:]
            raise AssertionError(f"{node.name} exited ({node.proc.returncode}):\n{tail}")
        return bool(node.get("/ready", timeout=5)["ready"])

    wait_until(ready, timeout, f"{node.name} ready")


def stop_all(nodes: Iterator[NodeProc] | Sequence[NodeProc] | Any) -> None:
    """SIGTERM every running node (resuming stopped ones first), kill those that hang."""
    nodes = list(nodes)
    for node in nodes:
        if node.running():
            node.proc.send_signal(signal.SIGCONT)
            node.proc.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()


def alive(view: dict[str, Any]) -> set[str]:
    """Return the names a /cluster view holds alive."""
    return {m["name"] for m in view["members"] if m["state"] == "alive"}


def holders(nodes: Mapping[str, NodeProc], model: str) -> set[str]:
    """Return the running nodes whose own /models lists `model` loaded."""
    found = set()
    for node in nodes.values():
        if node.running():
            states = {m["name"]: m["state"] for m in node.get("/models")["models"]}
            if states.get(model) == "loaded":
                found.add(node.name)
    return found


def complete(node: NodeProc, model: str = "m") -> tuple[int, Any]:
    """Send a 4-token completion to `node`; return (status, body)."""
    return node.post("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 4})
