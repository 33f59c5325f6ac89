"""How one change spreads, pinned in the simulator at heavy loss (memberlist's mechanism).

memberlist sends each broadcast retransmit-limit times from every node that learns it, on gossip
packets and piggybacked on probes and acks alike; a node that none of those copies reaches
learns the change at its next push-pull. These tests pin exactly that: with 50% loss the
gossip reaches nearly everyone in about a second, and the few it misses are repaired by
push-pull within one (scaled) interval, never lost.
"""

from __future__ import annotations

import pytest

from cluster.config import lan
from cluster.membership import EventKind
from tests.cluster.sim import ChangeTracker, Network, Sim

N = 40
LOSS = 0.5


def lossy_cluster(seed: int, n: int = N) -> tuple[Sim, list[str]]:
    sim = Sim(lan(), seed=seed, network=Network(loss=0.0), wire=False)
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


@pytest.mark.parametrize("seed", [1, 2])
def test_every_node_passes_a_change_on_exactly_the_retransmit_limit_times(seed: int) -> None:
    sim, names = lossy_cluster(seed)
    tracker = spread(sim, names[3], b"models=llama")
    limit = lan().retransmit_limit(N)
    # Neither a suspicion nor another broadcast displaced the change from any queue early.
    assert dict(tracker.sent) == {n: limit for n in names}


def test_a_change_rides_on_probes_and_acks_as_well_as_on_gossip_packets() -> None:
    sim, names = lossy_cluster(3)
    tracker = spread(sim, names[5], b"models=llama")
    assert {"gossip", "Ping", "Ack"} <= set(tracker.carriers)


def test_at_half_loss_the_gossip_misses_only_nodes_no_copy_reached_and_push_pull_repairs_them() -> (
    None
):
    missed: list[str] = []
    for seed in (4, 6):
        sim, names = lossy_cluster(seed)
        for trial in range(4):
            origin = names[(trial * 7) % N]
            tracker = spread(sim, origin, f"gen={trial}".encode())
            assert tracker.gossip_end is not None
            # Memberlist's budget: every node that learns sends limit copies, half are lost.
            assert tracker.gossip_end < 3.0
            reached = {n for n, t in tracker.first_copy.items() if t < tracker.gossip_end}
            assert tracker.missed_by_gossip == set(names) - reached - {origin}
            for n in reached - {origin}:
                # No copy is refused (say, behind a suspicion at the same incarnation).
                assert tracker.learned[n] <= tracker.first_copy[n] + 0.01
            for n in tracker.missed_by_gossip:
                # The node's own next push-pull (if no peer's came first) carries the change.
                assert tracker.pushed[n] >= 1
                assert tracker.learned[n] <= tracker.gossip_end + lan().push_pull_scaled_s(N)
            missed.extend(tracker.missed_by_gossip)
            sim.run_for(3.0)
    # The seeds are chosen so that the repair path is exercised at least once.
    assert missed


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
