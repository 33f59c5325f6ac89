from __future__ import annotations

from cluster.awareness import Awareness


def test_a_healthy_node_probes_at_the_base_interval() -> None:
    assert Awareness(8).scale(1.0) == 1.0


def test_the_score_stretches_the_interval_and_clamps_at_max_minus_one() -> None:
    a = Awareness(8)
    assert a.apply_delta(3) == 3
    assert a.scale(1.0) == 4.0
    assert a.apply_delta(100) == 7
    assert a.scale(0.5) == 4.0


def test_the_score_never_goes_below_zero() -> None:
    a = Awareness(8)
    a.apply_delta(2)
    assert a.apply_delta(-5) == 0
