"""Chaos on a real 3-node moc-node cluster under load: kill -9 of a model worker and of a node,
SIGSTOP of the primary for 10 s, and a partition of the primary in network namespaces.

Three `moc-node run` processes (cluster profile "local", one shared key, model `m` a generated
tiny GGUF) take a steady load of small `/v1/completions` requests (max_tokens 2, every fourth
one streamed) from client threads bound to each node, while a sampler polls every node's
`/cluster` every 50 ms. For each fault the table gives:

- failed: requests that started in the fault's window and did not succeed; each must have
  ended with an error the client saw (an HTTP error, an SSE error event, or a refused or reset
  connection to a node that was really down);
- silent: requests that hung past the client timeout, were cut off without an error, or got a
  200 without a well-formed completion, or lost their connection to a node that was up (must be 0);
- detect: fault -> every other node's `/cluster` shows the target suspect or dead (for the
  worker: -> the holder's `/models` shows the worker gone or replaced);
- replace: fault -> the end of the first request started after the fault that succeeded
  (the model is served again; requests to a stopped or killed node do not count);
- false deaths: members never faulted that any node (not cut off from them) showed dead (must be 0);
- primaries: most distinct nodes whose `/cluster` said "I am primary" in overlapping sample
  intervals (each sample's send..receive span; conservative, must be <= 1).

Before the faults one small learning job and one goal are created on every node (when torch is
installed); at the end each must still be listed by its node (restored after a kill -9 too).

The partition runs on a second cluster of three network namespaces, each with two links: one
to a "cluster" bridge (gossip, peer RPC) and one to a "control" bridge (the bench's HTTP); the
fault sets the target's cluster link down, so the bench still sees both sides. It needs root
and `ip netns`; otherwise it is reported as skipped.

Usage: python bench/chaos.py [--quick] [--json] [--rate R] [--no-netns] [--partition-only]
       [--no-learning] [--keep DIR]   (DIR keeps the configs and node logs for a post-mortem)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.moc_node.cluster_procs import (  # noqa: E402
    NAMES,
    Addresses,
    NodeProc,
    alive,
    holders,
    start_cluster,
    wait_ready,
    wait_until,
)

CLIENT_TIMEOUT_S = 15.0
"""Client-side limit of one request: above the 10 s stop, so a request queued on a stopped node
may still finish after SIGCONT; past it the request counts as hung (a silent loss)."""
STOP_S = 10.0
SAMPLE_EVERY_S = 0.05
DOWN_STATES = {"suspect", "dead", "left"}

# -- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One client request: which node, when, and how it ended."""

    node: str
    start: float
    end: float
    kind: str  # ok | error | conn_error | timeout | truncated | bad_body
    detail: str = ""


@dataclass(frozen=True)
class Sample:
    """One GET /cluster of one node: the send..receive span and the view (None: no answer)."""

    node: str
    t0: float
    t1: float
    view: dict[str, Any] | None


@dataclass
class Phase:
    """One fault: its target, when it started and when the cluster was healthy again."""

    name: str
    target: str
    start: float
    end: float = 0.0
    down: list[tuple[str, float, float]] = field(default_factory=list)
    """(node, from, to): the node could not answer at all (killed or stopped)."""
    serve_elsewhere: bool = False
    """Only requests served by nodes other than the target count as "served again"."""
    cut_off: str | None = None
    """A node on the other side of a partition: its view of the others is not judged."""
    detection_s: float | None = None
    replacement_s: float | None = None
    notes: list[str] = field(default_factory=list)


# -- analysis (pure) -------------------------------------------------------------------------


def was_down(phases: Sequence[Phase], node: str, t0: float, t1: float) -> bool:
    """Return whether `node` was killed or stopped at some time within [t0, t1]."""
    for p in phases:
        for name, a, b in p.down:
            if name == node and a <= t1 and t0 <= b:
                return True
    return False


def classify(outcomes: Sequence[Outcome], phases: Sequence[Phase]) -> dict[str, list[Outcome]]:
    """Split the non-ok outcomes: errors the client saw vs silent losses.

    A refused or reset connection counts as an error only when its node was really down; a
    timeout on a stopped node is reported apart (nothing in a stopped process can answer).
    """
    split: dict[str, list[Outcome]] = {"failed": [], "silent": [], "timeout_on_stopped": []}
    for o in outcomes:
        if o.kind == "ok":
            continue
        split["failed"].append(o)
        down = was_down(phases, o.node, o.start, o.end)
        if o.kind == "error" or (o.kind == "conn_error" and down):
            continue
        if o.kind == "timeout" and down:
            split["timeout_on_stopped"].append(o)
            continue
        split["silent"].append(o)
    return split


def in_window(outcomes: Sequence[Outcome], start: float, end: float) -> list[Outcome]:
    """Return the outcomes of requests started within [start, end)."""
    return [o for o in outcomes if start <= o.start < end]


def member_state(view: Mapping[str, Any], name: str) -> str:
    """Return `name`'s state in a /cluster view ("absent" once reaped)."""
    for m in view["members"]:
        if m["name"] == name:
            return str(m["state"])
    return "absent"


def detection_time(
    samples: Sequence[Sample], target: str, observers: Sequence[str], since: float
) -> float | None:
    """Seconds from `since` until every observer had shown `target` suspect, dead or gone."""
    seen: list[float] = []
    for observer in observers:
        first = next(
            (
                s.t1
                for s in samples
                if s.node == observer
                and s.t0 >= since
                and s.view is not None
                and member_state(s.view, target) in DOWN_STATES | {"absent"}
            ),
            None,
        )
        if first is None:
            return None
        seen.append(first - since)
    return max(seen) if seen else None


def false_deaths(samples: Sequence[Sample], phase: Phase) -> dict[tuple[str, str], list[float]]:
    """Return (observer, member) -> sample times (from the phase start) where a never-faulted
    member was shown dead.

    A node cut off by a partition is not judged on its view of the other side.
    """
    found: dict[tuple[str, str], list[float]] = {}
    for s in samples:
        if s.view is None or not phase.start <= s.t0 < phase.end:
            continue
        if s.node == phase.cut_off:
            continue
        for m in s.view["members"]:
            if m["name"] != phase.target and m["state"] == "dead":
                found.setdefault((s.node, m["name"]), []).append(s.t1 - phase.start)
    return found


def acting_primaries(samples: Sequence[Sample], start: float, end: float) -> tuple[int, list[str]]:
    """Return the most distinct self-declared primaries in overlapping sample spans, and why.

    A node declares itself primary when its view's primary names itself (its own lease). Two
    claims whose send..receive spans overlap may have been true at the same instant, so they
    are counted together: conservative, a real overlap cannot be missed between samples.
    """
    claims = [
        (s.t0, s.t1, s.node, int(s.view["primary"]["term"]))
        for s in samples
        if s.view is not None
        and start <= s.t0 < end
        and s.view.get("primary")
        and s.view["primary"]["name"] == s.view["self"]
    ]
    events = sorted(
        [(t0, 0, i) for i, (t0, *_rest) in enumerate(claims)]
        + [(c[1], 1, i) for i, c in enumerate(claims)]
    )
    open_claims: dict[int, tuple[float, float, str, int]] = {}
    best, why = (1 if claims else 0), [] if not claims else [f"{claims[0][2]} term {claims[0][3]}"]
    for _t, kind, i in events:
        if kind == 1:
            open_claims.pop(i, None)
            continue
        open_claims[i] = claims[i]
        nodes = {c[2] for c in open_claims.values()}
        if len(nodes) > best:
            best = len(nodes)
            why = [f"{c[2]} term {c[3]} [{c[0]:.3f}, {c[1]:.3f}]" for c in open_claims.values()]
    return best, why


def replacement_time(
    outcomes: Sequence[Outcome], phases: Sequence[Phase], since: float, exclude: str | None
) -> float | None:
    """Seconds from `since` to the end of the first later-started request that succeeded on a
    node that was up (and is not `exclude`)."""
    ends = [
        o.end
        for o in outcomes
        if o.kind == "ok"
        and o.start >= since
        and o.node != exclude
        and not was_down(phases, o.node, o.start, o.end)
    ]
    return min(ends) - since if ends else None


# -- load and sampling (I/O) ------------------------------------------------------------------


def one_request(node: NodeProc, stream: bool) -> tuple[str, str]:
    """Send one small completion; return (kind, detail)."""
    body = {"model": "m", "prompt": "chaos", "max_tokens": 2, "stream": stream}
    req = urllib.request.Request(
        node.url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT_S) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        try:
            err = json.loads(e.read() or b"null")
        except (ValueError, OSError):
            return "bad_body", f"HTTP {e.code} without a JSON error"
        ok = isinstance(err, dict) and "error" in err
        return (
            ("error", f"HTTP {e.code} {json.dumps(err)[:160]}") if ok else ("bad_body", str(e.code))
        )
    except TimeoutError as e:
        return "timeout", str(e)
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            return "timeout", str(e.reason)
        return "conn_error", str(e.reason)
    except (ConnectionError, http.client.HTTPException) as e:
        return "conn_error", f"{type(e).__name__}: {e}"
    if not stream:
        try:
            doc = json.loads(raw)
            doc["choices"][0]["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            return "bad_body", raw[:160].decode(errors="replace")
        return "ok", ""
    finished = done = False
    for line in raw.decode(errors="replace").splitlines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            continue
        event = json.loads(data)
        if "error" in event:
            return "error", f"SSE error {json.dumps(event['error'])[:160]}"
        if event["choices"][0].get("finish_reason"):
            finished = True
    return ("ok", "") if finished and done else ("truncated", raw[-160:].decode(errors="replace"))


class Load:
    """Client threads, `per_node` bound to each node, each sending paced requests."""

    def __init__(self, nodes: Mapping[str, NodeProc], rate: float, per_node: int = 2) -> None:
        self.nodes = nodes
        self.interval = len(nodes) * per_node / rate
        self.per_node = per_node
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self._busy = threading.Semaphore(len(nodes) * per_node)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for name in self.nodes:
            for i in range(self.per_node):
                t = threading.Thread(target=self._run, args=(name, i), daemon=True)
                t.start()
                self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT_S + 5)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold new requests and wait for those in flight (while a fault is arranged)."""
        self._go.clear()
        held = 0
        for _ in range(len(self._threads)):
            held += self._busy.acquire(timeout=CLIENT_TIMEOUT_S + 5)
        try:
            yield
        finally:
            for _ in range(held):
                self._busy.release()
            self._go.set()

    def _run(self, name: str, index: int) -> None:
        n = index
        while not self._stop.is_set():
            if not self._go.wait(0.2):
                continue
            node = self.nodes[name]  # looked up each time: a restarted node keeps its entry
            with self._busy:
                start = time.monotonic()
                kind, detail = one_request(node, stream=n % 4 == 3)
            with self._lock:
                self.outcomes.append(Outcome(name, start, time.monotonic(), kind, detail))
            n += 1
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))  # pacing

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


class Sampler:
    """One thread per node polling its /cluster every SAMPLE_EVERY_S."""

    def __init__(self, nodes: Mapping[str, NodeProc]) -> None:
        self.nodes = nodes
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in nodes]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)

    def _run(self, name: str) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                view: dict[str, Any] | None = self.nodes[name].get("/cluster", timeout=1.0)
            except (OSError, ValueError, http.client.HTTPException):
                view = None
            t1 = time.monotonic()
            with self._lock:
                self.samples.append(Sample(name, t0, t1, view))
            self._stop.wait(max(0.0, SAMPLE_EVERY_S - (t1 - t0)))  # pacing

    def snapshot(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


# -- cluster helpers ---------------------------------------------------------------------------


def primary_of(nodes: Mapping[str, NodeProc]) -> str:
    """Return the primary every running node agrees on (waits for agreement)."""
    agreed: list[str] = []

    def check() -> bool:
        views = [n.get("/cluster", timeout=2) for n in nodes.values()]
        names = {v["primary"]["name"] if v["primary"] else None for v in views}
        agreed[:] = [str(x) for x in names]
        return len(names) == 1 and None not in names

    wait_until(check, 30, "one agreed primary")
    return agreed[0]


def healthy(nodes: Mapping[str, NodeProc], timeout: float = 60) -> None:
    """Wait until every node sees every node alive and all agree on one primary."""
    everyone = set(nodes)
    wait_until(
        lambda: all(alive(n.get("/cluster", timeout=2)) == everyone for n in nodes.values()),
        timeout,
        "all members alive in every view",
    )
    primary_of(nodes)


def place_only_on(nodes: Mapping[str, NodeProc], target: str, load: Load) -> None:
    """Have `m` loaded on `target` alone (a local load there, unloads elsewhere), with the
    load paused so no request reloads it elsewhere meanwhile."""
    with load.paused():
        status, body = nodes[target].post("/models", {"model_name": "m"})
        if status not in (200, 201, 409):
            raise RuntimeError(f"load of m on {target}: {status} {body}")

        def only_target() -> bool:
            for name in holders(nodes, "m") - {target}:
                req = urllib.request.Request(nodes[name].url + "/models/m", method="DELETE")
                with urllib.request.urlopen(req, timeout=60):
                    pass
            return holders(nodes, "m") == {target}

        wait_until(only_target, 30, f"m only on {target}")
        wait_until(
            lambda: all(n.get("/cluster")["models"].get("m") == [target] for n in nodes.values()),
            10,
            "the holder gossiped",
        )


def worker_pid(node: NodeProc, model: str = "m") -> int | None:
    for m in node.get("/models")["models"]:
        if m["name"] == model and m["state"] == "loaded":
            return int(m["pid"]) if m.get("pid") else None
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def poll_first(check: Any, timeout: float) -> float | None:
    """Poll `check` every 10 ms; return the monotonic time it first held, None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return time.monotonic()
        time.sleep(0.01)  # polling a condition with a deadline
    return None


# -- faults --------------------------------------------------------------------------------


def fault_worker_kill(nodes: Mapping[str, NodeProc], load: Load, settle: float) -> Phase:
    """kill -9 the worker process of `m` on its holder; wait until it is served again."""
    holder = sorted(holders(nodes, "m"))[0]
    place_only_on(nodes, holder, load)
    pid = worker_pid(nodes[holder])
    assert pid is not None, "GET /models gave no worker pid"
    phase = Phase("worker kill -9", holder, time.monotonic())
    os.kill(pid, signal.SIGKILL)
    seen = poll_first(lambda: worker_pid(nodes[holder]) != pid, 30)
    phase.detection_s = None if seen is None else seen - phase.start
    wait_until(lambda: worker_pid(nodes[holder]) not in (None, pid), 60, "a new worker")
    phase.notes.append(f"worker pid {pid} on {holder}")
    settle_wait(settle)
    phase.end = time.monotonic()
    return phase


def fault_node_kill(nodes: Mapping[str, NodeProc], load: Load, settle: float) -> Phase:
    """kill -9 a holder of `m` that is not the primary; restart it once the model moved."""
    primary = primary_of(nodes)
    target = next(n for n in nodes if n != primary)
    place_only_on(nodes, target, load)
    node = nodes[target]
    pid = worker_pid(node)
    phase = Phase("node kill -9", target, time.monotonic(), serve_elsewhere=True)
    node.proc.kill()
    node.proc.wait()
    wait_until(lambda: bool(holders(nodes, "m") - {target}), 60, "m placed elsewhere")
    orphan = pid is not None and poll_first(lambda: not pid_alive(pid), 10) is None
    phase.notes.append(
        f"the killed node's worker (pid {pid}) " + ("is still running" if orphan else "exited")
    )
    settle_wait(settle)
    restarted = time.monotonic()
    node.restart()
    wait_ready(node)
    ready = time.monotonic()
    phase.down.append((target, phase.start, ready))
    healthy(nodes)
    phase.notes.append(
        f"restart -> ready {ready - restarted:.1f} s, -> alive in every view "
        f"{time.monotonic() - ready:.1f} s more; m held by {sorted(holders(nodes, 'm'))}"
    )
    phase.end = time.monotonic()
    return phase


def fault_stop(nodes: Mapping[str, NodeProc], load: Load, settle: float, stop_s: float) -> Phase:
    """SIGSTOP the primary (holding `m`) for `stop_s`, then SIGCONT."""
    target = primary_of(nodes)
    place_only_on(nodes, target, load)
    node = nodes[target]
    phase = Phase(f"SIGSTOP {stop_s:.0f} s", target, time.monotonic(), serve_elsewhere=True)
    node.proc.send_signal(signal.SIGSTOP)
    resume = threading.Event()
    resume.wait(stop_s)  # the fault's duration, not synchronisation
    node.proc.send_signal(signal.SIGCONT)
    phase.down.append((target, phase.start, time.monotonic()))
    healthy(nodes)
    settle_wait(settle)
    phase.end = time.monotonic()
    return phase


def settle_wait(seconds: float) -> None:
    """Keep the load running for `seconds` (late effects: refutes, false deaths)."""
    threading.Event().wait(seconds)


# -- network namespaces ------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def netns_unavailable() -> str | None:
    """Return why a partition in namespaces cannot run here, or None."""
    if os.geteuid() != 0:
        return "skipped: needs root + ip netns (not root)"
    if shutil.which("ip") is None:
        return "skipped: needs root + ip netns (no ip command)"
    probe = f"chaos{os.getpid() % 100000}p"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"skipped: needs root + ip netns ({made.stderr.strip()})"
    _ip("netns", "del", probe, check=False)
    return None


class Namespaces:
    """Three namespaces, each linked to a cluster bridge and to a control bridge."""

    CLUSTER = "10.213.81"
    CONTROL = "10.213.82"

    def __init__(self, names: Sequence[str]) -> None:
        self.tag = f"cx{os.getpid() % 10000}"
        self.names = list(names)
        self.made: list[tuple[str, str]] = []

    def ns(self, i: int) -> str:
        return f"{self.tag}n{i}"

    def cluster_if(self, i: int) -> str:
        return f"{self.tag}c{i}"

    def addresses(self) -> dict[str, Addresses]:
        return {
            n: Addresses(f"{self.CLUSTER}.{i + 1}", "0.0.0.0", f"{self.CONTROL}.{i + 1}")
            for i, n in enumerate(self.names)
        }

    def prefixes(self) -> dict[str, list[str]]:
        return {n: ["ip", "netns", "exec", self.ns(i)] for i, n in enumerate(self.names)}

    def create(self) -> None:
        for bridge, subnet in (("cb", self.CLUSTER), ("kb", self.CONTROL)):
            br = self.tag + bridge
            _ip("link", "add", br, "type", "bridge")
            self.made.append(("link", br))
            _ip("link", "set", br, "up")
            if subnet == self.CONTROL:
                _ip("addr", "add", f"{subnet}.254/24", "dev", br)
        for i, _name in enumerate(self.names):
            ns = self.ns(i)
            _ip("netns", "add", ns)
            self.made.append(("netns", ns))
            _ip("-n", ns, "link", "set", "lo", "up")
            for bridge, subnet, outer in (
                ("cb", self.CLUSTER, self.cluster_if(i)),
                ("kb", self.CONTROL, f"{self.tag}k{i}"),
            ):
                inner = f"{outer}i"
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self.made.append(("link", outer))
                _ip("link", "set", inner, "netns", ns)
                _ip("link", "set", outer, "master", self.tag + bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")

    def cut(self, name: str, up: bool) -> None:
        i = self.names.index(name)
        _ip("link", "set", self.cluster_if(i), "up" if up else "down")

    def destroy(self) -> None:
        for kind, what in reversed(self.made):
            _ip(kind, "del", what, check=False)


def fault_partition(
    nodes: Mapping[str, NodeProc], load: Load, hosts: Namespaces, settle: float, cut_s: float
) -> Phase:
    """Cut the primary (holding `m`) off the cluster bridge for `cut_s`, then heal."""
    target = primary_of(nodes)
    place_only_on(nodes, target, load)
    phase = Phase(
        f"partition {cut_s:.0f} s", target, time.monotonic(), serve_elsewhere=True, cut_off=target
    )
    hosts.cut(target, up=False)
    threading.Event().wait(cut_s)  # the fault's duration, not synchronisation
    hosts.cut(target, up=True)
    healed = time.monotonic()
    healthy(nodes)
    phase.notes.append(f"heal -> one view and one primary: {time.monotonic() - healed:.1f} s")
    settle_wait(settle)
    phase.end = time.monotonic()
    return phase


# -- learning jobs and goals -----------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


LEARNING = """
[learning]
dataset_dirs = ["{data}"]
torch_threads = 1
checkpoint_every = 2
max_parallel_jobs = 1
"""


def write_dataset(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"text": f"The {a} {v} on the {n}."})
        for a in ("cat", "dog", "fox")
        for v in ("sat", "slept")
        for n in ("mat", "log", "rug")
    ]
    (data / "text.jsonl").write_text("\n".join(lines) + "\n")
    return data


def create_work(nodes: Mapping[str, NodeProc], data: Path) -> dict[str, tuple[str, str]]:
    """Create one tiny LoRA job and one goal on every node; return name -> (job, goal)."""
    params = {"steps": 6, "lr": 0.01, "seq_len": 16, "batch_size": 2, "lora_rank": 2}
    made: dict[str, tuple[str, str]] = {}
    for name, node in nodes.items():
        status, job = node.post(
            "/learning/jobs",
            {
                "job_type": "lora",
                "model_name": "m",
                "dataset_path": str(data / "text.jsonl"),
                "training_params": params,
                "output_name": f"m-chaos-{name}",
            },
        )
        if status != 201:
            raise RuntimeError(f"job on {name}: {status} {job}")
        status, goal = node.post(
            "/goals",
            {
                "title": f"chaos goal on {name}",
                "metadata": {
                    "model_name": "m",
                    "dataset_path": str(data / "text.jsonl"),
                    "training_params": {**params, "eval_fraction": 0.0},
                },
            },
        )
        if status != 201:
            raise RuntimeError(f"goal on {name}: {status} {goal}")
        made[name] = (str(job["job_id"]), str(goal["goal_id"]))
    return made


def count_lost(
    nodes: Mapping[str, NodeProc], made: Mapping[str, tuple[str, str]]
) -> dict[str, Any]:
    """Return how many jobs and goals their node no longer lists, and their statuses."""
    jobs_lost = goals_lost = 0
    statuses: dict[str, list[str]] = {}
    for name, (job_id, goal_id) in made.items():
        node = nodes[name]
        found = []
        for path in (f"/learning/jobs/{job_id}", f"/goals/{goal_id}"):
            try:
                item = node.get(path)
                # A failure is allowed (it is not a loss) but must say why.
                error = item.get("error") if item["status"] == "failed" else None
                found.append(str(item["status"]) + (f" ({error})" if error else ""))
            except urllib.error.HTTPError as e:
                found.append(f"HTTP {e.code}")
        jobs_lost += found[0].startswith("HTTP")
        goals_lost += found[1].startswith("HTTP")
        statuses[name] = found
    return {"jobs_lost": jobs_lost, "goals_lost": goals_lost, "statuses": statuses}


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything one cluster's part of the benchmark produced."""

    phases: list[Phase]
    outcomes: list[Outcome]
    samples: list[Sample]


@contextlib.contextmanager
def under_load(nodes: Mapping[str, NodeProc], rate: float) -> Iterator[tuple[Load, Sampler]]:
    sampler = Sampler(nodes)
    load = Load(nodes, rate)
    sampler.start()
    load.start()
    try:
        yield load, sampler
    finally:
        load.stop()
        sampler.stop()


def loopback_part(root: Path, args: argparse.Namespace, report: dict[str, Any]) -> Run:
    """Baseline, worker kill, node kill and SIGSTOP on a loopback cluster."""
    settle = 2.0 if args.quick else 15.0
    learn = torch_available() and not args.no_learning
    extra = LEARNING.format(data=write_dataset(root)) if learn else ""
    with start_cluster(root, extra=extra) as nodes:
        healthy(nodes)
        status, body = nodes[NAMES[0]].post(
            "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1}
        )
        assert status == 200, body
        made = create_work(nodes, root / "data") if learn else {}
        phases: list[Phase] = []
        with under_load(nodes, args.rate) as (load, sampler):
            base = Phase("baseline (no fault)", "", time.monotonic())
            settle_wait(3.0 if args.quick else 20.0)
            base.end = time.monotonic()
            phases.append(base)
            phases.append(fault_worker_kill(nodes, load, settle))
            phases.append(fault_node_kill(nodes, load, settle))
            phases.append(fault_stop(nodes, load, settle, STOP_S))
        outcomes, samples = load.snapshot(), sampler.snapshot()
        if learn:
            report["work"] = count_lost(nodes, made)
        else:
            report["work"] = {"skipped": "--no-learning or torch not installed"}
    return Run(phases, outcomes, samples)


def netns_part(root: Path, args: argparse.Namespace) -> Run:
    """A partition of the primary, in network namespaces."""
    settle = 2.0 if args.quick else 15.0
    hosts = Namespaces(NAMES)
    try:
        hosts.create()
        with start_cluster(root, addresses=hosts.addresses(), prefixes=hosts.prefixes()) as nodes:
            healthy(nodes)
            with under_load(nodes, args.rate) as (load, sampler):
                phase = fault_partition(nodes, load, hosts, settle, 10.0)
            return Run([phase], load.snapshot(), sampler.snapshot())
    finally:
        hosts.destroy()


def evaluate(run: Run) -> list[dict[str, Any]]:
    """Fill in detection and replacement times; return one table row per phase."""
    rows = []
    for p in run.phases:
        outcomes = in_window(run.outcomes, p.start, p.end)
        split = classify(outcomes, run.phases)
        if p.target and p.detection_s is None:
            observers = sorted({s.node for s in run.samples} - {p.target})
            p.detection_s = detection_time(run.samples, p.target, observers, p.start)
        if p.target:
            exclude = p.target if p.serve_elsewhere else None
            p.replacement_s = replacement_time(run.outcomes, run.phases, p.start, exclude)
        deaths = false_deaths(run.samples, p)
        on_target = sum(o.node == p.target for o in split["failed"])
        errors: dict[str, int] = {}
        for o in split["failed"]:
            key = f"{'to target' if o.node == p.target else 'via others'}: {o.detail[:110]}"
            errors[key] = errors.get(key, 0) + 1
        primaries, why = acting_primaries(run.samples, p.start, p.end)
        rows.append(
            {
                "fault": p.name,
                "target": p.target or "-",
                "requests": len(outcomes),
                "failed": len(split["failed"]),
                "silent": len(split["silent"]),
                "timeout_on_stopped": len(split["timeout_on_stopped"]),
                "detection_s": p.detection_s,
                "replacement_s": p.replacement_s,
                "failed_on_target": on_target,
                "false_deaths": sorted(
                    f"{a} saw {b} dead in {len(t)} samples, {min(t):.2f}..{max(t):.2f} s "
                    "into the phase"
                    for (a, b), t in deaths.items()
                ),
                "max_acting_primaries": primaries,
                "primaries_why": why if primaries > 1 else [],
                "errors": [f"{n} x {e}" for e, n in sorted(errors.items(), key=lambda x: -x[1])][
                    :6
                ],
                "silent_examples": [
                    f"{o.node} {o.kind} {o.detail[:100]}" for o in split["silent"][:5]
                ],
                "notes": p.notes,
            }
        )
    return rows


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    head = (
        f"{'fault':<20} {'target':<7} {'reqs':>5} {'failed':>6} {'(target)':>8} {'silent':>6} "
        f"{'detect s':>8} {'replace s':>9} {'false deaths':>12} {'primaries':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['fault']:<20} {r['target']:<7} {r['requests']:>5} {r['failed']:>6} "
            f"{r['failed_on_target']:>8} {r['silent']:>6} {fmt(r['detection_s']):>8} "
            f"{fmt(r['replacement_s']):>9} "
            f"{len(r['false_deaths']):>12} {r['max_acting_primaries']:>9}"
        )
    for r in rows:
        extra = r["notes"] + r["false_deaths"] + r["primaries_why"] + r["silent_examples"]
        if r["timeout_on_stopped"]:
            extra.append(f"{r['timeout_on_stopped']} timed out on the stopped node")
        extra += [f"failed {e}" for e in r["errors"]]
        for line in extra:
            print(f"  {r['fault']}: {line}")


def main() -> None:
    """Run the faults and print the table (and a JSON line with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under two minutes")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--rate", type=float, default=30.0, help="requests per second, all nodes")
    ap.add_argument("--no-netns", action="store_true", help="skip the partition")
    ap.add_argument("--partition-only", action="store_true", help="only the partition")
    ap.add_argument("--no-learning", action="store_true", help="no jobs and goals")
    ap.add_argument("--keep", metavar="DIR", help="keep configs and node logs under DIR")
    args = ap.parse_args()
    wall = time.monotonic()
    report: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(args.keep)
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moc-chaos-")))
        if args.partition_only:
            report["work"] = {"skipped": "--partition-only"}
        else:
            (root / "loop").mkdir()
            rows += evaluate(loopback_part(root / "loop", args, report))
        reason = "skipped: --no-netns" if args.no_netns else netns_unavailable()
        if reason is None:
            (root / "ns").mkdir()
            rows += evaluate(netns_part(root / "ns", args))
    print(
        f"\nchaos on a 3-node loopback cluster, {args.rate:.0f} req/s, client timeout "
        f"{CLIENT_TIMEOUT_S:.0f} s"
    )
    print_table(rows)
    if reason is not None:
        print(f"partition: {reason}")
    work = report["work"]
    if "skipped" in work:
        print(f"jobs and goals: {work['skipped']}")
    else:
        print(
            f"jobs lost: {work['jobs_lost']}, goals lost: {work['goals_lost']} "
            f"(status at the end, per node: {work['statuses']})"
        )
    faults = [r for r in rows if r["target"] != "-"]
    figures: dict[str, Any] = {
        "failed_requests": {r["fault"]: r["failed"] for r in rows},
        "failed_on_target": {r["fault"]: r["failed_on_target"] for r in rows},
        "silent_losses": {r["fault"]: r["silent"] for r in rows},
        "detection_s": {r["fault"]: r["detection_s"] for r in faults},
        "replacement_s": {r["fault"]: r["replacement_s"] for r in faults},
        "false_deaths": {r["fault"]: len(r["false_deaths"]) for r in rows},
        "max_acting_primaries": max((r["max_acting_primaries"] for r in rows), default=0),
        "acting_primaries": {r["fault"]: r["max_acting_primaries"] for r in rows},
        "jobs_lost": work.get("jobs_lost"),
        "goals_lost": work.get("goals_lost"),
        "requests": sum(r["requests"] for r in rows),
        "partition": "ran" if reason is None else reason,
        "wall_s": round(time.monotonic() - wall, 1),
    }
    print(f"wall time {figures['wall_s']} s")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
