"""Gossip benchmarks in the deterministic simulator, against the anchors of
`shared/reference/gossip-anchors.md` (Serf convergence table, memberlist/Lifeguard targets).

Measured here (simulated time, LAN profile, the real membership code):
- dissemination: time for one metadata change to reach every node, p50/p99 over trials, at
  0/20/50% datagram loss (Serf: 2.0/2.6/4.0 s for N <= 200; goal: at or under);
- detection: time from a crash until every node holds the node dead (goal: median <= 8 s at N=10,
  <= 12 s at N=100);
- false deaths over a simulated stretch with 5% loss (goal 0);
- idle bytes per second per node, real encoded packets (goal <= 1 KB/s at N=200).

Measured for real: join16_ms, 16 `tests.cluster.demo` processes on loopback (local profile, UDP +
TCP push-pull, HMAC-signed): all start and bind, then are told to join one seed at the same
instant; the figure is the time until the last node sees all 16 (alive or suspect, as
memberlist's NumMembers counts; its integration-test anchor: 250 ms). Each process stamps the moment with CLOCK_MONOTONIC, which is
system-wide, so no pipe latency is counted.

Measured for real too: forward_overhead_ms, two nodes on loopback, a 1-token completion sent
to the holder vs sent to a peer that forwards it.

Usage: python -m bench.gossip [--quick] [--json] [--real-only | --sim-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.config import ClusterConfig, lan  # noqa: E402
from cluster.membership import EventKind  # noqa: E402
from cluster.messages import MemberState  # noqa: E402
from tests.cluster.procs import DemoProc, poll_until  # noqa: E402
from tests.cluster.sim import ChangeTracker, Network, Sim  # noqa: E402

SERF_P9999_S = {0: 2.0, 20: 2.6, 50: 4.0}
LAN = lan()
MEMBERLIST_JOIN16_MS = 250.0


def pct(values: list[float], q: float) -> float:
    """Return the q-quantile (nearest rank) of values."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Trial:
    """One change followed to every node."""

    seconds: float
    """Until the last running node held the change (the cap if `censored`)."""
    censored: bool
    """Someone still lacked it at the cap (two scaled push-pull intervals)."""
    gossip_s: float | None
    """Until the last copy of the change left the last broadcast queue."""
    missed_by_gossip: int
    """Nodes no copy reached before that: they learned by push-pull."""


def dissemination(
    n: int, loss: float, trials: int, seed: int, config: ClusterConfig = LAN
) -> list[Trial]:
    """Return, per trial, how long a metadata change took to reach every node, and how."""
    sim = Sim(config, seed=seed, wire=False)
    names = sim.add_cluster(n)
    sim.run_until(sim.converged, 60.0, check_every=0.5)
    sim.net.loss = loss
    # A node the gossip misses waits for a push-pull: up to one scaled interval for its own.
    cap = 2 * sim.config.push_pull_scaled_s(n) + 10
    results = []
    for trial in range(trials):
        origin = names[(trial * 7919) % n]
        tracker = ChangeTracker.start(sim, origin, f"gen={trial}".encode())
        done = sim.run_until(tracker.watch, tracker.t0 + cap, check_every=0.01)
        seconds = sim.now - tracker.t0
        sim.run_until(tracker.drained, sim.now + 10, check_every=0.01)
        results.append(Trial(seconds, not done, tracker.gossip_end, len(tracker.missed_by_gossip)))
        tracker.stop()
        sim.run_for(5.0)
    return results


def detection(n: int, trials: int, seed: int, config: ClusterConfig = LAN) -> list[float]:
    """Return, per trial, seconds from a crash until every live node holds it dead."""
    out = []
    for trial in range(trials):
        sim = Sim(config, seed=seed + trial, wire=False)
        names = sim.add_cluster(n)
        sim.run_until(sim.converged, 60.0, check_every=0.5)
        sim.run_for(3.0 + trial % 3)
        victim = names[(trial * 31 + 1) % n]
        sim.crash(victim)
        t0 = sim.now

        def everyone(v: str = victim, sim: Sim = sim) -> bool:
            return all(
                (m := sim.nodes[o].membership.member(v)) is None or m.state == MemberState.DEAD
                for o in sim.up_names()
            )

        sim.run_until(everyone, t0 + 120, check_every=0.05)
        out.append(sim.now - t0)
    return out


def false_deaths(
    n: int, loss: float, seconds: float, seed: int, config: ClusterConfig = LAN
) -> tuple[int, int, int]:
    """Return (false deaths, suspicions, refutes) over `seconds` of lossy running."""
    # Streams lose packets too: a TCP fallback ping can then miss the probe deadline (TCP's
    # 1 s retransmit), so suspicions start and must be refuted; ideal streams never fail.
    sim = Sim(config, seed=seed, network=Network(loss=0.0, stream_retry_s=1.0), wire=False)
    sim.add_cluster(n)
    sim.run_until(sim.converged, 60.0, check_every=0.5)
    sim.net.loss = loss
    start = len(sim.log)
    sim.run_for(seconds)
    log = sim.log[start:]
    deaths = sum(1 for _, _, e in log if e.kind == EventKind.DEAD)
    suspicions = sum(1 for _, _, e in log if e.kind == EventKind.SUSPECT)
    refutes = sum(node.membership.counters.refutes for node in sim.nodes.values())
    return deaths, suspicions, refutes


def idle_bytes(n: int, seconds: float, seed: int, config: ClusterConfig = LAN) -> float:
    """Return the mean bytes sent per second per node once the cluster is quiet."""
    sim = Sim(config, seed=seed, wire=True)
    sim.add_cluster(n)
    sim.run_until(sim.converged, 60.0, check_every=0.5)
    sim.run_for(30.0)  # let the join broadcasts drain
    before = sum(node.bytes_out for node in sim.nodes.values())
    sim.run_for(seconds)
    after = sum(node.bytes_out for node in sim.nodes.values())
    return (after - before) / seconds / n


def join_real(n: int, key_file: str) -> float:
    """Return ms from telling n held-back processes to join until the last sees all n alive."""
    procs = [DemoProc("j00", ["--key-file", key_file])]
    try:
        seed = procs[0].wait_ready()
        for i in range(1, n):
            procs.append(
                DemoProc(f"j{i:02d}", ["--key-file", key_file, "--hold-join", "--seed", seed])
            )
        for p in procs:
            p.wait_ready()
        t0 = time.monotonic()
        for p in procs[1:]:
            p.send("join")

        def known(view: dict[str, object]) -> int:
            # memberlist's NumMembers: every member not dead (alive or suspect), as its test counts.
            members = view["members"]
            assert isinstance(members, dict)
            return sum(s in ("alive", "suspect") for s in members.values())

        def full(p: DemoProc) -> bool:
            return p.view is not None and known(p.view) == n

        if not poll_until(lambda: all(full(p) for p in procs), 60.0):
            raise RuntimeError(
                f"{n} processes did not converge: {[p.diagnostics() for p in procs]}"
            )
        seen = []
        for p in procs:
            with p.cond:
                seen.append(min(v["t"] for v in p.views if v["t"] >= t0 and known(v) == n))
        return (max(seen) - t0) * 1000
    finally:
        for p in procs:
            p.close()


def join16(trials: int) -> list[float]:
    """Return join16 times (ms) over `trials` fresh 16-process clusters."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        key.write_text("0123456789abcdef0123456789abcdef\n")
        return [join_real(16, str(key)) for _ in range(trials)]


def forward_overhead(requests: int) -> tuple[float, float]:
    """Return p50 ms of 1-token completions sent to B directly and sent to A, forwarded to B.

    Two real nodes on loopback; the model is loaded on B only, so A forwards every request over
    the peer RPC. Requests alternate between the two paths so load affects both alike.
    """
    from tests.moc_node.cluster_procs import start_cluster, wait_until

    direct: list[float] = []
    forwarded: list[float] = []
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    with (
        tempfile.TemporaryDirectory(prefix="moc-forward-") as tmp,
        start_cluster(Path(tmp), names=("node-a", "node-b")) as nodes,
    ):
        a, b = nodes["node-a"], nodes["node-b"]
        status, _ = b.post("/models", {"model_name": "m"})
        assert status == 201, status
        wait_until(lambda: a.get("/cluster")["models"].get("m") == ["node-b"], 30, "gossip")
        for i in range(requests + 20):
            for node, out in ((b, direct), (a, forwarded)):
                began = time.perf_counter()
                status, _ = node.post("/v1/completions", body)
                assert status == 200, status
                if i >= 20:  # warm-up: connections, caches
                    out.append((time.perf_counter() - began) * 1000)
    return statistics.median(direct), statistics.median(forwarded)


def real_figures(quick: bool, figures: dict[str, object]) -> None:
    """Measure and print the real-process figures (join16, forwarding) into `figures`."""
    runs = join16(1 if quick else 3)
    figures["join16_ms"] = round(statistics.median(runs), 1)
    figures["join16_runs_ms"] = [round(r, 1) for r in runs]
    print(
        f"join of 16 real processes on loopback (local profile): median "
        f"{figures['join16_ms']} ms over {len(runs)} run(s), max {max(runs):.1f} ms "
        f"(memberlist anchor {MEMBERLIST_JOIN16_MS:.0f} ms)\n"
    )
    direct_ms, forwarded_ms = forward_overhead(100 if quick else 500)
    figures["forward_overhead_ms"] = round(forwarded_ms - direct_ms, 2)
    print(
        f"forwarding: 1-token completion p50 {direct_ms:.2f} ms sent to the holder, "
        f"{forwarded_ms:.2f} ms sent to a peer that forwards: +{forwarded_ms - direct_ms:.2f} ms "
        "(goal +1 ms)\n"
    )


def main() -> None:
    """Run the benchmarks and print a table (and a JSON line with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under two minutes")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--real-only", action="store_true", help="only the real-process figure")
    ap.add_argument("--sim-only", action="store_true", help="only the simulated figures")
    ap.add_argument(
        "--retransmit-base",
        type=int,
        default=LAN.retransmit_base,
        help="simulate with this cluster.retransmit_base (0: memberlist's budget)",
    )
    args = ap.parse_args()
    config = dataclasses.replace(LAN, retransmit_base=args.retransmit_base)
    wall = time.monotonic()
    figures: dict[str, object] = {}
    if not args.sim_only:
        real_figures(args.quick, figures)
    if args.real_only:
        figures["wall_s"] = round(time.monotonic() - wall, 1)
        if args.json:
            print(json.dumps(figures))
        return
    if args.quick:
        sizes, trials, det_sizes, det_trials = [10, 100], 5, [10, 100], 5
        fd_n, fd_s, idle_n, idle_s = 100, 600.0, 100, 60.0
    else:
        sizes, trials, det_sizes, det_trials = [10, 100, 1000], 20, [10, 100], 20
        fd_n, fd_s, idle_n, idle_s = 100, 3600.0, 200, 120.0
    print(
        f"retransmits: {config.retransmit_base} + {config.retransmit_mult}*ceil(log10(N+1)) "
        "per node that learns a change (memberlist: 0 + 4*...)"
    )
    print(
        "dissemination of one change to all nodes (simulated s; Serf 99.99% anchor)\n"
        "gossip p99: until the change left the last queue; by push-pull: trials in which\n"
        "no gossip copy reached some node (it learned at a push-pull)"
    )
    print(
        f"{'N':>6} {'loss':>5} {'p50':>7} {'p99':>7} {'anchor':>7} {'gossip p99':>11} "
        f"{'by push-pull':>13}"
    )
    largest: dict[str, float] = {}
    by_push_pull: dict[str, int] = {}
    for n in sizes:
        for loss in (0, 20, 50):
            runs = dissemination(n, loss / 100, trials, seed=n + loss, config=config)
            times = [r.seconds for r in runs]
            p50, p99 = statistics.median(times), pct(times, 0.99)
            gossip = pct([r.gossip_s if r.gossip_s is not None else r.seconds for r in runs], 0.99)
            repaired = sum(1 for r in runs if r.missed_by_gossip)
            over = ">" if any(r.censored and r.seconds >= p99 for r in runs) else " "
            print(
                f"{n:>6} {loss:>4}% {p50:>7.2f} {over}{p99:>6.2f} {SERF_P9999_S[loss]:>7.1f} "
                f"{gossip:>11.2f} {f'{repaired}/{len(runs)}':>13}"
            )
            if n == sizes[-1]:
                largest[str(loss)] = round(p99, 3)
                by_push_pull[str(loss)] = repaired
    figures["dissemination_p99_s"] = largest
    figures["dissemination_n"] = sizes[-1]
    figures["dissemination_trials"] = trials
    figures["dissemination_by_push_pull"] = by_push_pull
    print("\ncrash -> dead everywhere (simulated s)")
    det: dict[int, float] = {}
    for n in det_sizes:
        times = detection(n, det_trials, seed=1000 + n, config=config)
        det[n] = statistics.median(times)
        print(
            f"N={n:>4}: median {det[n]:.2f} s, p99 {pct(times, 0.99):.2f} s, max {max(times):.2f} s "
            f"(goal median <= {8 if n <= 10 else 12} s)"
        )
    figures["detection_median_s"] = round(det[det_sizes[0]], 3)
    figures["detection_median_s_by_n"] = {str(k): round(v, 3) for k, v in det.items()}
    deaths, suspicions, refutes = false_deaths(fd_n, 0.05, fd_s, seed=7, config=config)
    print(
        f"\nfalse deaths, N={fd_n}, 5% loss, {fd_s:.0f} simulated s: {deaths} "
        f"(suspicion events {suspicions}, refutes {refutes}; goal 0)"
    )
    figures["false_deaths"] = deaths
    figures["false_deaths_sim_s"] = fd_s
    bps = idle_bytes(idle_n, idle_s, seed=3, config=config)
    print(f"\nidle bytes/s per node, N={idle_n}: {bps:.0f} B/s (goal <= 1024)")
    figures["idle_bytes_per_s"] = round(bps, 1)
    figures["idle_n"] = idle_n
    figures["retransmit_base"] = config.retransmit_base
    figures["wall_s"] = round(time.monotonic() - wall, 1)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
