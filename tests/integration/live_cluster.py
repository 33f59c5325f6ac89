"""Three real `moc-node run` processes on loopback, and what the live fuzz tests observe of them.

The members (`tests/moc_node/cluster_procs.py`) share one cluster key; the generated tiny model is
placed on one of them. Observation goes through the members' own surfaces: /cluster, /models,
/metrics and their logs.
"""

from __future__ import annotations

import random
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cluster.keyring import Keyring, parse_keys
from cluster.messages import Address
from tests.fuzz.test_live_frames import mutate as mutate_bytes
from tests.moc_node.cluster_procs import (
    KEY,
    NAMES,
    NodeProc,
    alive,
    complete,
    holders,
    start_cluster,
    wait_until,
)

SEED = 0x676F73
BATCH = 50
"""Frames sent before waiting for the counters to catch up (a UDP socket buffer holds ~100)."""
KEYRING = parse_keys(KEY)
WRONG = Keyring((b"not-this-clusters-key-0123456789",))
FUZZ = "fuzzer"
"""Name the test gives itself in pings and peer requests: never a member."""
WAIT_S = 30.0


@dataclass(frozen=True)
class Member:
    """One node process and its cluster ports."""

    node: NodeProc
    gossip: Address
    peer: int

    @property
    def name(self) -> str:
        return self.node.name


@dataclass(frozen=True)
class Cluster:
    members: dict[str, Member]
    holder: str


def member(node: NodeProc) -> Member:
    assert node.config is not None
    section = tomllib.loads(node.config.read_text())["cluster"]
    host, _, port = section["bind"].rpartition(":")
    return Member(node, (host, int(port)), int(section["peer_port"]))


def primary_of(node: NodeProc) -> str | None:
    p = node.get("/cluster")["primary"]
    return None if p is None else str(p["name"])


def healthy(c: Cluster) -> bool:
    """Return whether every member sees all three alive and the same primary."""
    views = [m.node.get("/cluster") for m in c.members.values()]
    primaries = {v["primary"]["name"] if v["primary"] else None for v in views}
    return (
        all(alive(v) == set(NAMES) for v in views) and len(primaries) == 1 and None not in primaries
    )


@contextmanager
def live_cluster(tmp: Path) -> Iterator[Cluster]:
    """Start three members that see each other, with model "m" placed on one of them."""
    with start_cluster(tmp) as nodes:
        wait_until(
            lambda: all(alive(n.get("/cluster")) == set(NAMES) for n in nodes.values()),
            60,
            "three alive members",
        )
        wait_until(
            lambda: (
                len({primary_of(n) for n in nodes.values()} - {None}) == 1
                and all(primary_of(n) for n in nodes.values())
            ),
            60,
            "one primary",
        )
        # The first request places the model (the primary picks a holder, which loads it); an
        # election in between refuses it with a stale term: setup only needs it done once.
        wait_until(lambda: complete(nodes[NAMES[1]])[0] == 200, 60, "model placed and served")
        (holder,) = holders(nodes, "m")
        yield Cluster({n: member(p) for n, p in nodes.items()}, holder)


Samples = dict[str, Counter[tuple[str, ...]]]
"""Metric name -> label values -> value."""


def scrape(node: NodeProc) -> Samples:
    """Return every sample of the node's /metrics: name -> label values -> value."""
    with urllib.request.urlopen(node.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, Counter())[tuple(s.labels.values())] += int(s.value)
    return out


def by_label(samples: Samples, name: str) -> Counter[str]:
    """Return a one-label metric as label value -> value."""
    return Counter({labels[0]: n for labels, n in samples.get(name, Counter()).items()})


def by_label2(samples: Samples, name: str) -> Counter[tuple[str, str]]:
    """Return a two-label metric as (label, label) -> value."""
    return Counter({(k[0], k[1]): n for k, n in samples.get(name, Counter()).items()})


def scalar(samples: Samples, name: str) -> int:
    return sum(samples.get(name, Counter()).values())


def worker_pid(node: NodeProc) -> int | None:
    pid: int | None = next(m["pid"] for m in node.get("/models")["models"] if m["name"] == "m")
    return pid


def no_failures_logged(node: NodeProc) -> list[str]:
    """Return the log lines that tell of an exception escaping a handler or a task."""
    marks = ("Traceback", "Exception in callback", "exception was never retrieved", "failed")
    return [
        ln
        for ln in node.log.read_text(errors="replace").splitlines()
        if any(m in ln for m in marks)
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Mutate `data` as the ZeroMQ fuzz does, or extend it; never return it unchanged."""
    if rng.random() < 0.15:
        return data + rng.randbytes(rng.randint(1, 64))
    out = mutate_bytes(rng, data)
    # A delete or splice at the very end may change nothing: that would be a replay.
    return out if out != data else data + bytes([rng.randrange(256)])


def until(cond: Callable[[], bool], what: str) -> None:
    wait_until(cond, WAIT_S, what)



def assert_whole(cluster: Cluster, before: dict[str, Samples], after: dict[str, Samples]) -> None:
    """Check that no member crashed, died, left or stayed suspect, and one primary is agreed.

    A suspicion that was refuted is allowed: on a busy machine a member's event loop can be
    descheduled past the probe timeout whatever the fuzz does (tests do not fail on speed). A
    fuzz that wedged a member would show as a death here.
    """
    suspicions = {}
    for name, m in cluster.members.items():
        assert m.node.running(), f"{name} exited"
        metric = "moc_gossip_suspicions_total"
        suspicions[name] = scalar(after[name], metric) - scalar(before[name], metric)
        states = by_label(after[name], "moc_cluster_members")
        assert states["dead"] == states["left"] == 0, (name, states)
        assert no_failures_logged(m.node) == []
    assert sum(scalar(s, "moc_cluster_primary") for s in after.values()) <= 1  # never two
    print(f"suspicions started during the run (refuted): {suspicions}")
    until(lambda: healthy(cluster), "all alive, one agreed primary")
