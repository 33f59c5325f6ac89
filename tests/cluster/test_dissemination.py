"""How one change spreads, pinned in the simulator at heavy loss.

Every node that learns a broadcast sends it retransmit-limit times, on gossip packets and
piggybacked on probes and acks alike (memberlist's mechanism); a node that none of those copies
reaches learns the change at its next push-pull. At 50% loss a node receives about half of the
limit per node, and misses every copy with probability about exp(-limit / 2). With memberlist's
budget (4 * ceil(log10(N + 1)), retransmit_base 0) that is a few percent of nodes at N = 40,
which push-pull repairs within one (scaled) interval; the LAN default adds 14 sends so that the
gossip alone reaches every node.
"""

from __future__ import annotations

import dataclasses

import pytest

from cluster.config import ClusterConfig, lan
from cluster.membership import EventKind
from tests.cluster.sim import ChangeTracker, Network, Sim

N = 40
LOSS = 0.5
MEMBERLIST = dataclasses.replace(lan(), retransmit_base=0)
"""memberlist's DefaultLANConfig budget: 4 * ceil(log10(N + 1)) sends, 8 at N = 40."""


def lossy_cluster(seed: int, config: ClusterConfig, n: int = N) -> tuple[Sim, list[str]]:
    sim = Sim(config, seed=seed, network=Network(loss=0.0), wire=False)
    names = sim.add_cluster(n)
    assert sim.run_until(sim.converged, 30.0, check_every=0.5)
    sim.net.loss = LOSS
    return sim, names


def spread(sim: Sim, origin: str, meta: bytes) -> ChangeTracker:
    """Change origin's metadata and run until every node knows (or two push-pull intervals)."""
    tracker = ChangeTracker.start(sim, origin, meta)
    limit = tracker.t0 + 2 * sim.config.push_pull_scaled_s(len(sim.nodes)) + 5
    assert sim.run_until(tracker.watch, limit, check_every=0.01), (
        f"not everyone learned {meta!r} within {limit - tracker.t0:.0f} s: "
        f"{sorted(set(sim.up_names()) - set(tracker.learned))}"
    )
    assert sim.run_until(tracker.drained, sim.now + 10, check_every=0.01)
    # A node push-pull repaired passes the change on too: let those copies go out.
    assert sim.run_until(lambda: not tracker.queued_anywhere(), sim.now + 10, check_every=0.1)
    tracker.stop()
    return tracker


def spread_trials(config: ClusterConfig) -> list[tuple[list[str], ChangeTracker]]:
    """Spread 8 changes at 50% loss (2 clusters, 4 origins each); the seeds are fixed."""
    runs = []
    for seed in (4, 6):
        sim, names = lossy_cluster(seed, config)
        for trial in range(4):
            runs.append((names, spread(sim, names[(trial * 7) % N], f"gen={trial}".encode())))
            sim.run_for(3.0)
    return runs


@pytest.mark.parametrize("seed", [1, 2])
def test_every_node_passes_a_change_on_exactly_the_retransmit_limit_times(seed: int) -> None:
    sim, names = lossy_cluster(seed, lan())
    tracker = spread(sim, names[3], b"models=llama")
    limit = lan().retransmit_limit(N)
    assert limit == 22  # 14 + 4 * ceil(log10 41)
    # Neither a suspicion nor another broadcast displaced the change from any queue early.
    assert dict(tracker.sent) == {n: limit for n in names}


def test_a_change_rides_on_probes_and_acks_as_well_as_on_gossip_packets() -> None:
    sim, names = lossy_cluster(3, lan())
    tracker = spread(sim, names[5], b"models=llama")
    assert {"gossip", "Ping", "Ack"} <= set(tracker.carriers)


def test_with_memberlists_budget_push_pull_repairs_the_nodes_no_gossip_copy_reached() -> None:
    missed: list[str] = []
    for names, tracker in spread_trials(MEMBERLIST):
        origin = tracker.origin
        assert tracker.gossip_end is not None
        # Every node that learns sends limit copies, half are lost.
        assert tracker.gossip_end < 3.0
        reached = {n for n, t in tracker.first_copy.items() if t < tracker.gossip_end}
        assert tracker.missed_by_gossip == set(names) - reached - {origin}
        for n in reached - {origin}:
            # No copy is refused (say, behind a suspicion at the same incarnation).
            assert tracker.learned[n] <= tracker.first_copy[n] + 0.01
        for n in tracker.missed_by_gossip:
            # The node's own next push-pull (if no peer's came first) carries the change.
            assert tracker.pushed[n] >= 1
            assert tracker.learned[n] <= tracker.gossip_end + MEMBERLIST.push_pull_scaled_s(N)
        missed.extend(tracker.missed_by_gossip)
    # About exp(-4) of 312 nodes: the repair path is exercised several times.
    assert len(missed) >= 3


def test_with_the_lan_retransmit_base_the_gossip_alone_reaches_every_node_at_half_loss() -> None:
    runs = spread_trials(lan())
    copies = [t.received[n] for names, t in runs for n in names if n != t.origin]
    # The mechanism: about limit / 2 copies reach each node, so exp(-11) of them get none
    # (memberlist's 8 sends give 4 copies, exp(-4) = 1.8%: the previous test's repairs).
    assert sum(copies) / len(copies) == pytest.approx((1 - LOSS) * lan().retransmit_limit(N), 0.1)
    assert min(copies) >= 1
    for _, tracker in runs:
        assert not tracker.missed_by_gossip
        assert max(tracker.learned.values()) < 4.0  # Serf's 50% loss anchor
        assert tracker.gossip_end is not None and tracker.gossip_end < 3.5


def test_a_node_no_datagram_reaches_still_learns_a_change_by_push_pull() -> None:
    # UDP firewalled, TCP open: the probes pass over the TCP fallback, the gossip never does.
    sim = Sim(lan(), seed=7)
    names = sim.add_cluster(10)
    assert sim.run_until(sim.converged, 10.0)
    deaf = names[7]
    sim.net.deaf.add(deaf)
    tracker = ChangeTracker.start(sim, names[2], b"models=llama")
    interval = lan().push_pull_scaled_s(10)
    assert sim.run_until(tracker.everyone_knows, tracker.t0 + interval + 1)
    assert tracker.received[deaf] == 0
    assert tracker.pushed[deaf] >= 1
    sim.run_for(2 * interval)
    assert not sim.events(EventKind.SUSPECT)
    tracker.stop()
