"""Primary election: the voter and fencing rules alone, then safety and liveness in the simulator."""

from __future__ import annotations

import dataclasses
import random

import pytest

from cluster.config import ClusterConfig, lan
from cluster.election import Election, Fence, MemoryTermStore, majority
from cluster.membership import MemberView
from cluster.messages import LeaseReply, LeaseRequest, MemberState
from tests.cluster.sim import Network, Sim

VOTERS3 = dataclasses.replace(lan(), voters=("n0", "n1", "n2"))


class StaticView:
    """A membership view where the listed names are alive."""

    def __init__(self, alive: set[str]) -> None:
        self.alive = alive

    def member(self, name: str) -> MemberView | None:
        if name not in self.alive:
            return None
        return MemberView(name, ("10.0.0.1", 7946), 1, MemberState.ALIVE, b"", 0.0)


def voter(name: str = "n1", now: float = 100.0, store: MemoryTermStore | None = None) -> Election:
    return Election(
        VOTERS3, name, store or MemoryTermStore(), StaticView(set()), random.Random(1), now
    )


def reply(e: Election, req: LeaseRequest, now: float) -> LeaseReply:
    (out,) = e.handle(req, ("10.0.0.9", 7946), now)
    msg = out.messages[0]
    assert isinstance(msg, LeaseReply)
    return msg


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_a_majority_of_two_voters_is_both_of_them(n: int, m: int) -> None:
    assert majority(n) == m


def test_a_restarted_voter_grants_nothing_for_one_lease() -> None:
    e = voter(now=0.0)
    assert not reply(e, LeaseRequest(1, "n0", 1), 1.0).granted
    assert reply(e, LeaseRequest(1, "n0", 2), 5.0).granted


def test_a_voter_grants_one_lease_at_a_time_until_it_expires() -> None:
    e = voter(now=0.0)
    assert reply(e, LeaseRequest(1, "n0", 1), 10.0).granted
    assert not reply(e, LeaseRequest(2, "n2", 1), 12.0).granted
    assert reply(e, LeaseRequest(1, "n0", 2), 13.0).granted  # renewal by the holder
    assert not reply(e, LeaseRequest(3, "n2", 2), 17.9).granted
    assert reply(e, LeaseRequest(3, "n2", 3), 18.0).granted  # 13 + 5 s lease has run out
    assert e.granted_to(18.0) == ("n2", 3)


def test_a_voter_refuses_an_old_term_and_reports_the_newer_one() -> None:
    e = voter(now=0.0)
    assert reply(e, LeaseRequest(4, "n0", 1), 10.0).granted
    r = reply(e, LeaseRequest(3, "n2", 1), 20.0)
    assert not r.granted and r.term == 4


def test_a_voter_persists_the_term_before_granting() -> None:
    store = MemoryTermStore()
    e = voter(now=0.0, store=store)
    reply(e, LeaseRequest(7, "n0", 1), 10.0)
    assert store.term == 7
    assert voter(now=20.0, store=store).highest_term == 7


def test_a_non_voter_does_not_answer() -> None:
    e = voter(name="n4", now=0.0)
    assert e.handle(LeaseRequest(1, "n0", 1), ("10.0.0.9", 7946), 10.0) == []


def test_the_fence_refuses_commands_from_an_older_term() -> None:
    store = MemoryTermStore(3)
    seen: list[int] = []
    fence = Fence(store, seen.append)
    assert not fence.admit(2)
    assert fence.admit(3)
    assert fence.admit(5)
    assert not fence.admit(4)
    assert store.term == 5 and seen == [5]


def test_only_the_lowest_healthy_non_witness_voter_stands() -> None:
    cfg = dataclasses.replace(VOTERS3, witnesses=("n0",))
    e = Election(
        cfg, "n2", MemoryTermStore(), StaticView({"n0", "n1", "n2"}), random.Random(1), 0.0
    )
    assert e.candidate() == "n1"
    e.view = StaticView({"n0", "n2"})
    assert e.candidate() == "n2"


# ---------------------------------------------------------------------- simulator


def cluster(
    cfg: ClusterConfig, n: int, seed: int, loss: float = 0.0
) -> tuple[Sim, list[str], dict[str, MemoryTermStore]]:
    sim = Sim(cfg, seed=seed, network=Network(loss=loss))
    names = sim.add_cluster(n, prefix="n")
    stores = {name: MemoryTermStore() for name in names}
    for i, name in enumerate(names):
        sim.attach(
            name,
            Election(
                cfg, name, stores[name], sim.nodes[name].membership, random.Random(i), sim.now
            ),
        )
    return sim, names, stores


def acting(sim: Sim) -> list[str]:
    return [n for n in sim.up_names() if sim.nodes[n].extra.is_primary(sim.now)]


def all_windows(
    sim: Sim, extra: list[tuple[float, float, int, str]]
) -> list[tuple[float, float, int, str]]:
    return extra + [(s, e, t, n) for n, node in sim.nodes.items() for s, e, t in node.extra.windows]


def assert_no_two_primaries_overlap(windows: list[tuple[float, float, int, str]]) -> None:
    merged: dict[str, list[tuple[float, float]]] = {}
    for s, e, _, n in sorted(windows):
        spans = merged.setdefault(n, [])
        if spans and s <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], e))
        else:
            spans.append((s, e))
    flat = sorted((s, e, n) for n, spans in merged.items() for s, e in spans)
    latest_end: dict[str, float] = {}
    for s, e, n in flat:
        for other, end in latest_end.items():
            assert other == n or s >= end, f"{other} acts until {end}, {n} from {s}"
        latest_end[n] = max(latest_end.get(n, e), e)


def test_the_lowest_voter_becomes_the_only_primary() -> None:
    sim, names, _ = cluster(VOTERS3, 5, seed=1)
    assert sim.run_until(lambda: acting(sim) == ["n0"], 15.0)
    sim.run_for(30)
    assert acting(sim) == ["n0"]
    assert sim.nodes["n0"].extra.counters.elections_won == 1


def test_after_the_primary_crashes_the_next_voter_takes_over_with_a_higher_term() -> None:
    sim, names, _ = cluster(VOTERS3, 5, seed=2)
    assert sim.run_until(lambda: acting(sim) == ["n0"], 15.0)
    old_term = sim.nodes["n0"].extra.term
    sim.crash("n0")
    t0 = sim.now
    assert sim.run_until(lambda: acting(sim) == ["n1"], t0 + 60)
    assert sim.nodes["n1"].extra.term > old_term
    # No earlier than the crashed primary's lease could have run out.
    assert sim.now >= sim.nodes["n0"].extra.lease_until()


def test_a_majority_side_elects_and_a_minority_side_has_none() -> None:
    sim, names, _ = cluster(VOTERS3, 5, seed=3)
    assert sim.run_until(lambda: acting(sim) == ["n0"], 15.0)
    sim.partition(["n0", "n3"], ["n1", "n2", "n4"])
    assert sim.run_until(lambda: acting(sim) == ["n1"], sim.now + 60)
    sim.run_for(30)
    assert acting(sim) == ["n1"]
    sim.heal()
    sim.run_for(60)
    assert len(acting(sim)) == 1
    assert_no_two_primaries_overlap(all_windows(sim, []))


def test_two_voters_cut_apart_leave_no_primary_on_either_side() -> None:
    cfg = dataclasses.replace(lan(), voters=("n0", "n1"))
    sim, _, _ = cluster(cfg, 4, seed=4)
    assert sim.run_until(lambda: acting(sim) == ["n0"], 15.0)
    sim.partition(["n0", "n2"], ["n1", "n3"])
    sim.run_for(40)
    assert acting(sim) == []
    assert_no_two_primaries_overlap(all_windows(sim, []))


def test_a_witness_voter_lets_one_of_two_hosts_keep_a_primary() -> None:
    cfg = dataclasses.replace(lan(), voters=("n0", "n1", "n2"), witnesses=("n2",))
    sim, _, _ = cluster(cfg, 3, seed=5)
    assert sim.run_until(lambda: acting(sim) == ["n0"], 15.0)
    sim.partition(["n0"], ["n1", "n2"])
    assert sim.run_until(lambda: acting(sim) == ["n1"], sim.now + 60)
    assert not sim.nodes["n2"].extra.is_primary(sim.now)


def test_never_two_primaries_over_a_long_run_of_random_partitions_and_crashes() -> None:
    cfg = dataclasses.replace(lan(), voters=("n0", "n1", "n2", "n3", "n4"))
    sim, names, stores = cluster(cfg, 7, seed=6, loss=0.05)
    rng = random.Random(60)
    windows: list[tuple[float, float, int, str]] = []
    elected_after_heal = 0
    for _ in range(40):
        action = rng.random()
        if action < 0.4:
            side = rng.sample(names, rng.randint(1, 3))
            sim.partition(side)
        elif action < 0.6:
            victim = rng.choice([n for n in names if sim.nodes[n].up])
            windows += [(s, e, t, victim) for s, e, t in sim.nodes[victim].extra.windows]
            sim.crash(victim)
        else:
            sim.heal()
            for n in names:
                if not sim.nodes[n].up:
                    sim.restart(n, join=[m for m in names if sim.nodes[m].up][:1])
                    sim.attach(
                        n,
                        Election(
                            cfg,
                            n,
                            stores[n],
                            sim.nodes[n].membership,
                            random.Random(rng.random()),
                            sim.now,
                        ),
                    )
            if sim.run_until(lambda: len(acting(sim)) == 1, sim.now + 40):
                elected_after_heal += 1
        sim.run_for(rng.uniform(2, 15))
    assert_no_two_primaries_overlap(all_windows(sim, windows))
    assert elected_after_heal >= 1
