"""The fence the runner hands out must admit the acting primary's commands.

A candidate that cannot win (the cut-off side of a partition) used to bump its term on every
retry, and the acting primary kept renewing an older term after replies told it of a newer one:
every fence then refused the primary's placements. Now a failed round is retried with the same
term, and a primary that learns of a newer term steps down and stands again above it.
"""

from __future__ import annotations

import dataclasses
import random

from cluster.config import local
from cluster.election import Election, Fence, MemoryTermStore
from tests.cluster.sim import Sim


def test_after_a_partition_heals_every_fence_admits_the_acting_primarys_term() -> None:
    cfg = dataclasses.replace(local(), voters=("n0", "n1", "n2"))
    sim = Sim(cfg, seed=3)
    names = sim.add_cluster(3)
    stores = {n: MemoryTermStore() for n in names}
    elections = {
        n: Election(cfg, n, stores[n], sim.nodes[n].membership, random.Random(i), sim.now)
        for i, n in enumerate(names)
    }
    for n, e in elections.items():
        sim.attach(n, e)
    assert sim.run_until(lambda: any(e.is_primary(sim.now) for e in elections.values()), 10.0)
    first = next(n for n, e in elections.items() if e.is_primary(sim.now))
    sim.partition([first])
    sim.run_for(10.0)
    sim.heal()
    sim.run_for(20.0)
    acting = [e for e in elections.values() if e.is_primary(sim.now)]
    assert len(acting) == 1
    term = acting[0].term
    # The runner keeps each node's Fence at the highest term its election has seen.
    fences = {n: Fence(stores[n]) for n in names}
    assert all(f.admit(term) for f in fences.values()), {
        n: e.highest_term for n, e in elections.items()
    }
