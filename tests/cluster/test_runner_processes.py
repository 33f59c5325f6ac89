"""Real processes on loopback: five `tests.cluster.demo` nodes converge, a SIGKILLed one is declared
dead, a leaving one is recorded as left, and the voters agree on one primary (then a new one
when the primary is killed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.procs import DemoProc, agreed_primary, all_see

VOTERS = "n0,n1,n2"


@pytest.fixture
def procs() -> Iterator[list[DemoProc]]:
    started: list[DemoProc] = []
    try:
        yield started
    finally:
        for p in started:
            p.close()


def test_five_processes_converge_detect_a_kill_record_a_leave_and_fail_over(
    procs: list[DemoProc], tmp_path: Path
) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n")
    common = ["--key-file", str(key), "--voters", VOTERS]
    seed = DemoProc("n0", common)
    procs.append(seed)
    addr = seed.wait_ready()
    for i in range(1, 5):
        procs.append(DemoProc(f"n{i}", [*common, "--seed", addr]))
    for p in procs:
        p.wait_ready()
    names = [p.name for p in procs]
    assert all_see(procs, {n: "alive" for n in names}, 20.0), [p.diagnostics() for p in procs]

    name, term = agreed_primary(procs, 20.0)
    assert name == "n0"  # the lowest-named healthy voter stands and wins

    n0, n1, n2, n3, n4 = procs
    n0.kill()
    n4.send("leave")
    assert n4.wait(lambda p: p.left is not None, 10.0), n4.diagnostics()
    assert n4.left == {"event": "left", "ok": True}
    assert n4.proc.wait(10) == 0

    rest = [n1, n2, n3]
    assert all_see(rest, {"n0": "dead", "n4": "left", "n1": "alive"}, 20.0), [
        p.diagnostics() for p in rest
    ]
    new_name, new_term = agreed_primary(rest, 20.0)
    assert new_name == "n1"
    assert new_term > term
    # Nobody but the real nodes was ever seen, and no datagram was dropped as forged.
    for p in rest:
        assert set(p.states()) <= set(names)
        assert p.view is not None and "unauthenticated" not in p.view["dropped"]
