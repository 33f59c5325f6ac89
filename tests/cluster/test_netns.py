"""Three hosts in network namespaces on one bridge: cut the primary's link, check the majority
elects a new primary while the cut-off node stops acting (never two at once), heal, converge.

Needs root and `ip netns`; skipped with the reason otherwise. Every namespace, veth and bridge
it creates is removed in `finally`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.procs import DemoProc, acting, agreed_primary, all_see

TAG = f"m{os.getpid() % 100000}"
SUBNET = "10.213.77"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{TAG}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


_REASON = _netns_unavailable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class Hosts:
    """A bridge and three namespaces n1..n3 at SUBNET.1..3, each behind its own veth pair."""

    def __init__(self) -> None:
        self.bridge = f"{TAG}br"
        self.names = ["n1", "n2", "n3"]
        self.made: list[tuple[str, str]] = []

    def ns(self, name: str) -> str:
        return f"{TAG}{name}"

    def host_if(self, name: str) -> str:
        return f"{TAG}h{name[1:]}"

    def addr(self, name: str) -> str:
        return f"{SUBNET}.{name[1:]}"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        _ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns, host_if, inner = self.ns(name), self.host_if(name), f"{TAG}c{name[1:]}"
            _ip("netns", "add", ns)
            self.made.append(("netns", ns))
            _ip("link", "add", host_if, "type", "veth", "peer", "name", inner)
            self.made.append(("link", host_if))
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host_if, "master", self.bridge)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, name: str, up: bool) -> None:
        _ip("link", "set", self.host_if(name), "up" if up else "down")

    def destroy(self) -> None:
        for kind, what in reversed(self.made):
            _ip(kind, "del", what, check=False)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    h = Hosts()
    try:
        h.create()
        yield h
    finally:
        h.destroy()


def _no_overlapping_windows(procs: list[DemoProc]) -> None:
    """Acting windows of different nodes never overlap (the election's safety property)."""
    windows = [(p.name, w) for p in procs for w in (p.view or {}).get("windows", [])]
    for a, (ta, sa, ea) in windows:
        for b, (tb, sb, eb) in windows:
            if a < b:
                assert ea <= sb or eb <= sa, f"{a} term {ta} and {b} term {tb} overlap"


def test_a_cut_off_primary_stops_the_majority_elects_another_and_healing_converges(
    hosts: Hosts, tmp_path: Path
) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\n")
    procs: list[DemoProc] = []
    try:
        for name in hosts.names:
            args = ["--bind", f"{hosts.addr(name)}:7946", "--key-file", str(key)]
            args += ["--voters", ",".join(hosts.names)]
            if name != "n1":
                args += ["--seed", f"{hosts.addr('n1')}:7946"]
            procs.append(DemoProc(name, args, prefix=["ip", "netns", "exec", hosts.ns(name)]))
        for p in procs:
            p.wait_ready()
        everyone = {n: "alive" for n in hosts.names}
        assert all_see(procs, everyone, 20.0), [p.diagnostics() for p in procs]
        first, _ = agreed_primary(procs, 20.0)
        cut = next(p for p in procs if p.name == first)
        majority = [p for p in procs if p is not cut]

        hosts.cut(first, up=False)
        assert cut.wait(lambda p: not acting(p) and p.view is not None, 10.0), cut.diagnostics()
        second, _ = agreed_primary(majority, 20.0)
        assert second != first
        # The minority side ends up with no primary at all, not a stale one.
        assert cut.wait(lambda p: bool(p.view and p.view["primary"] is None), 20.0), (
            cut.diagnostics()
        )
        assert not acting(cut)

        hosts.cut(first, up=True)
        assert all_see(procs, everyone, 30.0), [p.diagnostics() for p in procs]
        agreed_primary(procs, 20.0)
        _no_overlapping_windows(procs)
    finally:
        for p in procs:
            p.close()
