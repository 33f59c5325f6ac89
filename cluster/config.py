"""Cluster configuration: one frozen dataclass, the `[cluster]` TOML section.

Defaults follow hashicorp/memberlist's `DefaultLANConfig` (see
`shared/reference/gossip-anchors.md`), plus `retransmit_base` (see its note); `local()` is the
fast preset for tests on one host, built with `dataclasses.replace` as memberlist builds
`DefaultLocalConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLUSTER_KEYS",
    "PROFILES",
    "WILDCARDS",
    "ClusterConfig",
    "from_mapping",
    "lan",
    "local",
    "parse_hostport",
    "push_pull_scale",
    "require_enabled",
    "retransmit_limit",
    "suspicion_timeout",
]


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Every knob of membership, gossip and election, with LAN defaults."""

    # --- identity and addresses -----------------------------------------------------------
    enabled: bool = False
    """Join a cluster at all. False (the default): a single node, with no gossip socket and no
    peer RPC port; every request is served locally. A `[cluster]` table that names `seeds` or
    `voters` must say `enabled` itself: without it the start is refused (see
    `require_enabled`), because a node meant for a cluster that quietly runs alone serves its
    own copy of everything. `enabled = false` with them keeps the node out on purpose."""
    name: str = ""
    """Node id, unique in the cluster. Empty: the node uses its hostname. Ids are compared as
    strings to pick the election candidate, so a stable, sortable name is best."""
    bind: str = "0.0.0.0:7946"
    """host:port of the gossip UDP socket (and the TCP push-pull listener on the same port).
    7946 is memberlist's and Serf's port."""
    advertise: str = ""
    """host:port peers should use to reach this node. Empty: `bind`, which must then name a
    concrete address (not 0.0.0.0)."""
    peer_port: int = 7213
    """TCP port of the peer RPC (ZMQ ROUTER) used to forward requests; gossiped in metadata."""
    seeds: tuple[str, ...] = ()
    """host:port of nodes to join at start. Any one live seed is enough: push-pull gives the
    full view. Empty: start a new cluster."""
    key_file: str = ""
    """File of cluster keys, one per line (hex or base64, >= 16 bytes). The first signs, any
    verifies (rotation: add the new key second, deploy, move it first, deploy, drop the old).
    Empty: no key, which only tests may use."""
    voters: tuple[str, ...] = ()
    """Names of the nodes that vote in primary elections. Use 3 or 5: two voters cannot keep a
    majority through a partition (add a witness-only voter). Empty: no primary is ever elected."""
    witnesses: tuple[str, ...] = ()
    """Voters that vote but never stand as primary (nor serve models): the cheap third voter
    of a two-host cluster (`moc-node run --witness`). Must be listed in `voters` too."""
    profile: str = "lan"
    """Preset the other fields start from: "lan" (production) or "local" (fast, one host)."""

    # --- failure detection (SWIM) ---------------------------------------------------------
    probe_interval_s: float = 1.0
    """Seconds between probes of one random-ordered peer. Shorter: faster detection, more
    packets (about 2 per member per interval)."""
    probe_timeout_s: float = 0.5
    """Seconds to wait for a direct ack before asking `indirect_checks` peers. Should exceed
    the 99th percentile round trip; must be below `probe_interval_s`."""
    indirect_checks: int = 3
    """Peers asked to probe a silent target on our behalf. More: fewer false suspicions from
    one bad path, more packets per failed probe."""
    tcp_fallback: bool = True
    """Also ping a silent target over the reliable (TCP) channel, which survives UDP loss
    and catches a UDP-only misconfiguration."""
    suspicion_mult: int = 4
    """Suspicion timeout = mult * max(1, log10 N) * probe interval (4 s for N <= 10). Lifeguard's
    confirmations expected = mult - 2. Higher: fewer false deaths, slower detection."""
    suspicion_max_timeout_mult: int = 6
    """The suspicion timer starts at this multiple of the minimum and shrinks to the minimum
    as independent confirmations arrive (Lifeguard)."""
    awareness_max_multiplier: int = 8
    """Local health score caps at this - 1; the probe interval is stretched by (score + 1), so
    a node that is itself slow accuses others less."""

    # --- dissemination --------------------------------------------------------------------
    gossip_interval_s: float = 0.2
    """Seconds between gossip rounds that send queued broadcasts. Shorter: faster spread."""
    gossip_nodes: int = 3
    """Peers per gossip round (fanout)."""
    gossip_to_the_dead_s: float = 30.0
    """Dead or left members keep receiving gossip (so they learn they were declared dead and
    refute) and stay listed this long before they are reaped."""
    retransmit_mult: int = 4
    """Every node that learns a broadcast sends it retransmit_base + retransmit_mult *
    ceil(log10(N + 1)) times; this log-scaled part covers the ln N nodes a change must reach.
    4 is memberlist's RetransmitMult."""
    retransmit_base: int = 14
    """Sends of every broadcast on top of the log-scaled ones: 18 in all for N <= 9, 22 up to
    99, 26 up to 999. memberlist has none. At 50% datagram loss a node receives about half of
    the sends and misses every one with probability about exp(-sends / 2), whatever N; with
    memberlist's 12 sends at N = 100 some node waits for a push-pull (90 s) after one change in
    three. The 14 extra sends make that under 1% of changes up to N = 1000, the low end of each
    decade included (measured up to 200). They cost about twice memberlist's gossip packets per
    change; the peak rate stays capped by the fanout and the packet size. 0: memberlist's
    budget."""
    push_pull_interval_s: float = 30.0
    """Seconds between full-state syncs with one random peer over TCP; repairs what gossip
    lost and heals partitions. Scaled up above 32 members. 0 disables."""
    packet_bytes: int = 1400
    """Largest datagram, all piggybacked messages and the HMAC included: under a 1500-byte
    Ethernet MTU with IP/UDP headers to spare."""
    max_meta_bytes: int = 512
    """Largest node metadata (encoded), as memberlist and Serf tags; keeps an alive message
    and a ping in one packet."""
    max_stream_bytes: int = 4 * 1024 * 1024
    """Largest push-pull frame accepted over TCP (the full state of thousands of members)."""

    # --- primary election -----------------------------------------------------------------
    lease_s: float = 5.0
    """Lease a majority of voters grants the primary. Longer: slower failover after a crash,
    fewer elections on a flaky network."""
    lease_renew_s: float = 1.0
    """The primary renews its lease this often; several renewals fit in one lease."""
    lease_margin_s: float = 0.5
    """The primary stops acting this long before its lease ends, covering clock-rate drift
    and message delay between voters and primary."""
    election_retry_s: float = 1.0
    """A candidate that failed to win waits about this long (randomised) before retrying."""

    def validate(self) -> ClusterConfig:
        """Check ranges and relations between fields; raise ValueError naming the key."""
        positive = (
            "probe_interval_s",
            "probe_timeout_s",
            "gossip_interval_s",
            "gossip_to_the_dead_s",
            "lease_s",
            "lease_renew_s",
            "election_retry_s",
        )
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"cluster.{key}: must be > 0")
        for key in ("suspicion_mult", "suspicion_max_timeout_mult", "awareness_max_multiplier"):
            if getattr(self, key) < 1:
                raise ValueError(f"cluster.{key}: must be >= 1")
        for key in ("indirect_checks", "gossip_nodes", "retransmit_mult", "retransmit_base"):
            if getattr(self, key) < 0:
                raise ValueError(f"cluster.{key}: must be >= 0")
        if self.push_pull_interval_s < 0:
            raise ValueError("cluster.push_pull_interval_s: must be >= 0")
        if self.probe_timeout_s >= self.probe_interval_s:
            raise ValueError("cluster.probe_timeout_s: must be below probe_interval_s")
        if self.packet_bytes < 576 or self.packet_bytes > 65000:
            raise ValueError("cluster.packet_bytes: must be within 576..65000")
        if not 0 < self.max_meta_bytes <= self.packet_bytes // 2:
            raise ValueError("cluster.max_meta_bytes: must be within 1..packet_bytes/2")
        if self.max_stream_bytes < self.packet_bytes:
            raise ValueError("cluster.max_stream_bytes: must be >= packet_bytes")
        if self.lease_margin_s + self.lease_renew_s >= self.lease_s:
            raise ValueError("cluster.lease_margin_s: lease_renew_s + margin must be < lease_s")
        if self.profile not in PROFILES:
            raise ValueError(f"cluster.profile: must be one of {sorted(PROFILES)}")
        for key in ("bind", "advertise"):
            value = getattr(self, key)
            if value:
                parse_hostport(value, key)
        for seed in self.seeds:
            parse_hostport(seed, "seeds")
        if self.enabled and not self.advertise and parse_hostport(self.bind, "bind")[0] in WILDCARDS:
            # Peers cannot dial a wildcard: the runner would fail after the other ports opened.
            raise ValueError("cluster.advertise: required when bind is a wildcard address")
        if not 0 < self.peer_port < 65536:
            raise ValueError("cluster.peer_port: must be within 1..65535")
        if len(set(self.voters)) != len(self.voters):
            raise ValueError("cluster.voters: duplicate names")
        if not set(self.witnesses) <= set(self.voters):
            raise ValueError("cluster.witnesses: every witness must also be a voter")
        return self

    # --- derived timeouts ------------------------------------------------------------------
    # Not TOML keys: each follows from the fields above by the formula in its docstring, so a
    # faster profile shortens them together (memberlist documents its derived timeouts so).

    @property
    def stream_timeout_s(self) -> float:
        """Seconds a TCP push-pull or ping stream may take: max(10 * probe_timeout_s, 1).

        A stream carries a whole state, so it gets ten probe round trips; the 1 s floor keeps
        the fast `local` profile (0.1 s probes) from cutting off a loaded host. A joining node
        also waits this long for its seeds' view before it goes on alone.
        """
        return max(10 * self.probe_timeout_s, 1.0)

    @property
    def peer_ack_timeout_s(self) -> float:
        """Seconds a forwarded request waits for the holder's ack: max(0.5, 4 * probe_timeout_s).

        Four probe round trips: a holder that does not acknowledge in that time is taken as
        gone and the request goes to the next holder; the 0.5 s floor covers a busy event loop.
        """
        return max(0.5, 4 * self.probe_timeout_s)

    @property
    def reservation_s(self) -> float:
        """Seconds a model stays reserved for a restarting node: 10, whatever the profile.

        The node starts its loads right after the answers and gossips "loading" within a
        second; a reservation still open after this was a failed restore and is dropped.
        """
        return 10.0

    def suspicion_min_s(self, n: int) -> float:
        """Return the minimum suspicion timeout for a cluster of n members."""
        return suspicion_timeout(self.suspicion_mult, n, self.probe_interval_s)

    def retransmit_limit(self, n: int) -> int:
        """Return how often one broadcast is sent in a cluster of n members."""
        return retransmit_limit(self.retransmit_mult, n, self.retransmit_base)

    def push_pull_scaled_s(self, n: int) -> float:
        """Return the push-pull interval stretched for large clusters (memberlist pushPullScale)."""
        return push_pull_scale(self.push_pull_interval_s, n)


def suspicion_timeout(mult: int, n: int, interval_s: float) -> float:
    """Return mult * max(1, log10 n) * interval (memberlist suspicionTimeout, ms precision)."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    return mult * math.floor(node_scale * 1000) * interval_s / 1000


def retransmit_limit(mult: int, n: int, base: int = 0) -> int:
    """Return base + mult * ceil(log10(n + 1)) (memberlist retransmitLimit when base is 0)."""
    return base + mult * math.ceil(math.log10(n + 1))


def push_pull_scale(interval_s: float, n: int) -> float:
    """Return the interval multiplied by ceil(log2 n - log2 32) + 1 above 32 members."""
    threshold = 32
    if n <= threshold:
        return interval_s
    mult = math.ceil(math.log2(n) - math.log2(threshold)) + 1
    return interval_s * mult


def parse_hostport(value: str, key: str = "address") -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:7946"); raise ValueError naming the key."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"cluster.{key}: {value!r} is not host:port")
    return host.strip("[]"), int(port)


def lan() -> ClusterConfig:
    """Return the LAN defaults (memberlist DefaultLANConfig)."""
    return ClusterConfig()


def local() -> ClusterConfig:
    """Return a fast preset for clusters on one host and tests (20 ms gossip)."""
    return dataclasses.replace(
        lan(),
        profile="local",
        bind="127.0.0.1:7946",
        probe_interval_s=0.2,
        probe_timeout_s=0.1,
        gossip_interval_s=0.02,
        gossip_to_the_dead_s=3.0,
        push_pull_interval_s=0.5,
        lease_s=1.0,
        lease_renew_s=0.2,
        lease_margin_s=0.1,
        election_retry_s=0.2,
    )


PROFILES = {"lan": lan, "local": local}

WILDCARDS = ("0.0.0.0", "::")
"""Bind hosts that listen on every address: nobody can dial them, so `advertise` is needed."""

CLUSTER_KEYS = ("seeds", "voters")
"""Keys that only mean something to a node that joins a cluster (see `ClusterConfig.enabled`)."""


def require_enabled(d: Mapping[str, Any]) -> None:
    """Refuse a `[cluster]` table that names seeds or voters but says nothing of `enabled`.

    Raise ValueError naming the first such key; an explicit `enabled`, true or false, passes.
    """
    if "enabled" in d:
        return
    for key in CLUSTER_KEYS:
        if key in d:
            raise ValueError(
                f"cluster.{key}: set without `enabled`: add `enabled = true` to join the "
                "cluster (or `enabled = false` to run this node alone)"
            )

_TYPES: dict[str, type] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "tuple[str, ...]": tuple,
}


def from_mapping(d: Mapping[str, Any]) -> ClusterConfig:
    """Build a validated config from the `[cluster]` TOML table.

    `profile` picks the preset; other keys override it. An unknown key or a value of the wrong
    type raises ValueError naming the key.
    """
    profile = d.get("profile", "lan")
    if not isinstance(profile, str) or profile not in PROFILES:
        raise ValueError(f"cluster.profile: must be one of {sorted(PROFILES)}")
    base = PROFILES[profile]()
    kinds = {f.name: str(f.type) for f in dataclasses.fields(ClusterConfig)}
    changes: dict[str, Any] = {}
    for key, value in d.items():
        if key not in kinds:
            raise ValueError(f"cluster.{key}: unknown key")
        kind = kinds[key]
        if kind == "tuple[str, ...]":
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"cluster.{key}: must be a list of strings")
            value = tuple(value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"cluster.{key}: must be a number")
            try:
                value = float(value)
            except OverflowError:
                raise ValueError(f"cluster.{key}: {value} is too large") from None
            if not math.isfinite(value):
                raise ValueError(f"cluster.{key}: must be a finite number, got {value}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"cluster.{key}: must be an integer")
        elif not isinstance(value, _TYPES[kind]):
            raise ValueError(f"cluster.{key}: must be {kind}")
        changes[key] = value
    return dataclasses.replace(base, **changes).validate()
