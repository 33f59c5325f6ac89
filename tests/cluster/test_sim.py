"""Whole-cluster properties in the deterministic simulator (fake clock, seeded RNG, lossy net)."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.config import lan, local
from cluster.membership import EventKind
from cluster.messages import MemberState
from tests.cluster.sim import Network, Sim

DEAD = MemberState.DEAD
FAILED = (MemberState.DEAD, MemberState.LEFT)


def everyone_sees(sim: Sim, name: str, *states: MemberState) -> bool:
    return all(
        sim.sees(o, name, *states)
        or (sim.nodes[o].membership.member(name) is None and MemberState.DEAD in states)
        for o in sim.up_names()
    )


def test_a_replay_with_the_same_seed_is_identical() -> None:
    def run() -> list[tuple[float, str, str, str]]:
        sim = Sim(lan(), seed=5, network=Network(loss=0.1))
        names = sim.add_cluster(8)
        sim.run_for(5)
        sim.crash(names[2])
        sim.run_for(20)
        return [(t, o, e.kind.value, e.name) for t, o, e in sim.log]

    assert run() == run()


@pytest.mark.parametrize("n", [5, 30])
def test_a_cluster_joined_through_one_seed_converges(n: int) -> None:
    sim = Sim(lan(), seed=n)
    sim.add_cluster(n)
    assert sim.run_until(sim.converged, deadline=10.0)


def test_a_crashed_node_is_declared_dead_everywhere_within_the_suspicion_bounds() -> None:
    sim = Sim(lan(), seed=3)
    names = sim.add_cluster(10)
    assert sim.run_until(sim.converged, 10.0)
    sim.crash(names[4])
    t0 = sim.now
    assert sim.run_until(lambda: everyone_sees(sim, names[4], DEAD), t0 + 60)
    # Anchor: never more than suspicion max (6 x 4 s) plus a probe round and gossip.
    assert sim.now - t0 <= 24 + 3
    assert all(e.kind != EventKind.LEFT for _, _, e in sim.events(about=names[4]))


def test_a_graceful_leave_is_reported_as_left_not_dead() -> None:
    sim = Sim(lan(), seed=4)
    names = sim.add_cluster(10)
    assert sim.run_until(sim.converged, 10.0)
    leaver = sim.nodes[names[6]]
    sim._send(leaver, leaver.membership.leave(sim.now))
    assert sim.run_until(leaver.membership.leave_broadcast_done, sim.now + 10)
    sim.crash(names[6])
    others = [n for n in names if n != names[6]]
    assert sim.run_until(
        lambda: all(sim.sees(o, names[6], MemberState.LEFT) for o in others), sim.now + 5
    )
    sim.run_for(20)
    assert not sim.events(EventKind.DEAD, about=names[6])
    assert not sim.events(EventKind.SUSPECT, about=names[6])


def test_a_node_cut_off_briefly_refutes_and_nobody_dies_when_the_partition_heals() -> None:
    sim = Sim(lan(), seed=6)
    names = sim.add_cluster(12)
    assert sim.run_until(sim.converged, 10.0)
    victim = names[5]
    sim.partition([victim])
    # Long enough to be suspected, shorter than the 4 s minimum suspicion timeout.
    assert sim.run_until(lambda: bool(sim.events(EventKind.SUSPECT, about=victim)), sim.now + 5)
    sim.run_for(1.0)
    sim.heal()
    # Anchor: full agreement within one push-pull interval after the heal.
    assert sim.run_until(sim.converged, sim.now + lan().push_pull_interval_s)
    assert sim.nodes[victim].membership.counters.refutes >= 1
    assert not sim.events(EventKind.DEAD)


def test_after_a_long_partition_heals_the_two_sides_merge_into_one_view() -> None:
    cfg = dataclasses.replace(lan(), push_pull_interval_s=10.0, gossip_to_the_dead_s=15.0)
    sim = Sim(cfg, seed=7)
    names = sim.add_cluster(10)
    assert sim.run_until(sim.converged, 10.0)
    left, right = names[:6], names[6:]
    sim.partition(left, right)
    assert sim.run_until(lambda: sim.converged(left) and sim.converged(right), sim.now + 90)
    sim.run_for(30)  # both sides have reaped each other
    assert sim.nodes[left[0]].membership.member(right[0]) is None
    sim.heal()
    # The reconnect push-pull to failed members merges the views again.
    assert sim.run_until(sim.converged, sim.now + 3 * cfg.push_pull_scaled_s(10))


def test_no_false_deaths_at_five_percent_loss_and_every_suspicion_is_refuted() -> None:
    # Streams lose packets too (a 1 s TCP retransmit), so the TCP fallback ping can miss the
    # probe deadline and a suspicion can start: with ideal streams none ever would.
    network = Network(loss=0.05, dup=0.01, stream_retry_s=1.0)
    sim = Sim(lan(), seed=8, network=network)
    sim.add_cluster(30)
    assert sim.run_until(sim.converged, 15.0)
    sim.run_for(300)
    assert not sim.events(EventKind.DEAD)
    assert sim.converged()


@pytest.mark.parametrize("loss", [0.0, 0.2, 0.5])
def test_a_metadata_change_reaches_every_node(loss: float) -> None:
    sim = Sim(lan(), seed=9, network=Network(loss=loss))
    names = sim.add_cluster(20)
    sim.net.loss = 0.0
    assert sim.run_until(sim.converged, 15.0)
    sim.net.loss = loss
    sim.nodes[names[3]].membership.set_meta(b"models=llama", sim.now)

    def reached() -> bool:
        return all(
            sim.nodes[o].membership.member(names[3]).meta == b"models=llama"  # type: ignore[union-attr]
            for o in names
        )

    assert sim.run_until(reached, sim.now + 30, check_every=0.01)


def test_a_restarted_node_rejoins_over_its_old_dead_record() -> None:
    sim = Sim(lan(), seed=10)
    names = sim.add_cluster(6)
    assert sim.run_until(sim.converged, 10.0)
    sim.crash(names[2])
    assert sim.run_until(lambda: everyone_sees(sim, names[2], DEAD), sim.now + 60)
    sim.restart(names[2], join=[names[0]])
    assert sim.run_until(sim.converged, sim.now + 10)
    assert sim.nodes[names[2]].membership.incarnation > 1


def test_a_node_whose_event_loop_stalls_for_seconds_is_not_declared_dead() -> None:
    sim = Sim(lan(), seed=11, network=Network(loss=0.01))
    names = sim.add_cluster(20)
    assert sim.run_until(sim.converged, 10.0)
    for i, stall in enumerate((2.0, 3.5, 5.0)):
        sim.stall(names[i + 1], stall)
        sim.run_for(20)
    assert not sim.events(EventKind.DEAD)
    assert sim.converged()


def test_hundreds_of_nodes_converge_and_detect_a_crash() -> None:
    sim = Sim(lan(), seed=12, wire=False)
    names = sim.add_cluster(300)
    assert sim.run_until(sim.converged, 30.0, check_every=0.5)
    sim.crash(names[100])
    t0 = sim.now
    assert sim.run_until(lambda: everyone_sees(sim, names[100], DEAD), t0 + 90, check_every=0.5)
    assert not [e for _, _, e in sim.events(EventKind.DEAD) if e.name != names[100]]


def test_sixteen_nodes_on_the_local_profile_join_within_250_ms_of_simulated_time() -> None:
    sim = Sim(local(), seed=13, network=Network(delay=(0.0001, 0.0005)))
    for i in range(16):
        sim.add_node(f"n{i:02d}", join=["n00"] if i else [])
    assert sim.run_until(sim.converged, 0.25, check_every=0.005)
