from __future__ import annotations

import dataclasses

import pytest

from cluster.config import (
    ClusterConfig,
    from_mapping,
    lan,
    local,
    push_pull_scale,
    retransmit_limit,
    suspicion_timeout,
)


def test_lan_defaults_match_memberlist_default_lan_config_plus_a_retransmit_base() -> None:
    c = lan()
    assert (c.probe_interval_s, c.probe_timeout_s, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.gossip_interval_s, c.gossip_nodes) == (0.2, 3)
    assert (c.retransmit_mult, c.suspicion_mult, c.suspicion_max_timeout_mult) == (4, 4, 6)
    # memberlist has no base; ours keeps a change from missing a node at 50% loss.
    assert c.retransmit_base == 14
    assert (c.awareness_max_multiplier, c.push_pull_interval_s) == (8, 30.0)
    assert (c.packet_bytes, c.max_meta_bytes) == (1400, 512)
    assert (c.bind, c.peer_port, c.profile) == ("0.0.0.0:7946", 7213, "lan")
    c.validate()


def test_local_preset_is_fast_and_valid() -> None:
    c = local().validate()
    assert c.profile == "local"
    assert c.gossip_interval_s == 0.02
    assert c.probe_interval_s < lan().probe_interval_s


@pytest.mark.parametrize(
    ("n", "expected_s"),
    [(1, 4.0), (10, 4.0), (100, 8.0), (200, 9.204)],
    ids=["n=1", "n=10", "n=100", "n=200"],
)
def test_suspicion_minimum_follows_the_log10_formula(n: int, expected_s: float) -> None:
    assert suspicion_timeout(4, n, 1.0) == pytest.approx(expected_s, abs=1e-3)


@pytest.mark.parametrize(
    ("probe_timeout_s", "stream_s", "ack_s"),
    [(0.5, 5.0, 2.0), (0.1, 1.0, 0.5), (0.05, 1.0, 0.5)],
    ids=["lan", "local", "below-both-floors"],
)
def test_derived_timeouts_follow_their_formulas_with_their_floors(
    probe_timeout_s: float, stream_s: float, ack_s: float
) -> None:
    c = dataclasses.replace(lan(), probe_timeout_s=probe_timeout_s).validate()
    assert c.stream_timeout_s == pytest.approx(stream_s)
    assert c.peer_ack_timeout_s == pytest.approx(ack_s)
    assert c.reservation_s == 10.0


def test_derived_timeouts_are_not_toml_keys() -> None:
    with pytest.raises(ValueError, match="cluster.stream_timeout_s: unknown key"):
        from_mapping({"stream_timeout_s": 3.0})


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 4), (9, 4), (10, 8), (99, 8), (100, 12), (200, 12)]
)
def test_retransmit_limit_is_mult_times_ceil_log10_n_plus_1(n: int, expected: int) -> None:
    assert retransmit_limit(4, n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 18), (9, 18), (10, 22), (99, 22), (100, 26), (200, 26), (1000, 30)],
)
def test_the_lan_retransmit_limit_adds_the_base_to_memberlists_log_scaled_sends(
    n: int, expected: int
) -> None:
    assert lan().retransmit_limit(n) == expected == retransmit_limit(4, n, base=14)


@pytest.mark.parametrize(("n", "expected_s"), [(10, 30.0), (32, 30.0), (33, 60.0), (200, 120.0)])
def test_push_pull_interval_scales_above_32_members(n: int, expected_s: float) -> None:
    assert push_pull_scale(30.0, n) == expected_s


def test_from_mapping_applies_the_profile_then_overrides() -> None:
    c = from_mapping({"profile": "local", "seeds": ["10.0.0.1:7946"], "probe_interval_s": 1})
    assert c.profile == "local"
    assert c.seeds == ("10.0.0.1:7946",)
    assert c.probe_interval_s == 1.0 and isinstance(c.probe_interval_s, float)
    assert c.gossip_interval_s == local().gossip_interval_s


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"probe_intervall_s": 1.0}, "probe_intervall_s"),
        ({"probe_interval_s": "fast"}, "probe_interval_s"),
        ({"indirect_checks": 2.5}, "indirect_checks"),
        ({"seeds": "10.0.0.1:7946"}, "seeds"),
        ({"tcp_fallback": 1}, "tcp_fallback"),
        ({"probe_timeout_s": 2.0}, "probe_timeout_s"),
        ({"profile": "wan"}, "profile"),
        ({"bind": "nohost"}, "bind"),
        ({"voters": ["a", "a"]}, "voters"),
        ({"lease_margin_s": 4.5}, "lease_margin_s"),
        ({"retransmit_base": -1}, "retransmit_base"),
    ],
    ids=[
        "unknown",
        "str-for-float",
        "float-for-int",
        "str-for-list",
        "int-for-bool",
        "timeout-above-interval",
        "bad-profile",
        "bad-address",
        "duplicate-voter",
        "margin",
        "negative-retransmit-base",
    ],
)
def test_from_mapping_rejects_bad_values_naming_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=f"cluster.{key}"):
        from_mapping(table)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClusterConfig().probe_interval_s = 2.0  # type: ignore[misc]
