"""Prometheus metrics of the cluster, read at scrape time from the runner's counters.

A custom collector, not module-level counters: the machines already keep monotonic counts, so
the collector only reports them (no double bookkeeping, and several runners in one test process
each get their own registry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = [
    "MEMBER_STATES",
    "ClusterCollector",
    "ClusterStats",
    "register",
]

MEMBER_STATES = ("alive", "suspect", "dead", "left")


@dataclass(frozen=True, slots=True)
class ClusterStats:
    """A snapshot of everything the metrics report."""

    members: Mapping[str, int] = field(default_factory=dict)
    """Members by state name (alive, suspect, dead, left), this node included."""
    primary: bool = False
    term: int = 0
    elections: int = 0
    suspicions: int = 0
    refutes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)
    """Messages dropped, by reason (unauthenticated, malformed, oversized, stale, ...)."""


class ClusterCollector(Collector):
    """Report `moc_cluster_*` and `moc_gossip_*` from a stats source."""

    def __init__(self, source: Callable[[], ClusterStats]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families for one scrape."""
        s = self.source()
        members = GaugeMetricFamily(
            "moc_cluster_members", "Cluster members by state, this node included", labels=["state"]
        )
        for state in MEMBER_STATES:
            members.add_metric([state], s.members.get(state, 0))
        yield members
        yield GaugeMetricFamily(
            "moc_cluster_primary", "1 if this node acts as primary now", value=int(s.primary)
        )
        yield GaugeMetricFamily("moc_cluster_term", "Highest election term seen", value=s.term)
        yield CounterMetricFamily(
            "moc_cluster_elections", "Elections this node started as candidate", value=s.elections
        )
        yield CounterMetricFamily(
            "moc_gossip_suspicions", "Members this node started suspecting", value=s.suspicions
        )
        yield CounterMetricFamily(
            "moc_gossip_refutes", "Suspicions of this node it refuted", value=s.refutes
        )
        by_dir = CounterMetricFamily(
            "moc_gossip_bytes", "Gossip bytes (UDP and TCP)", labels=["direction"]
        )
        by_dir.add_metric(["in"], s.bytes_in)
        by_dir.add_metric(["out"], s.bytes_out)
        yield by_dir
        packets = CounterMetricFamily(
            "moc_gossip_packets", "Gossip packets and frames", labels=["direction"]
        )
        packets.add_metric(["in"], s.packets_in)
        packets.add_metric(["out"], s.packets_out)
        yield packets
        dropped = CounterMetricFamily(
            "moc_gossip_messages_dropped", "Messages dropped, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.dropped.items()):
            dropped.add_metric([reason], n)
        yield dropped


def register(source: Callable[[], ClusterStats], registry: CollectorRegistry) -> ClusterCollector:
    """Register a collector for `source` in `registry` and return it (to unregister later)."""
    collector = ClusterCollector(source)
    registry.register(collector)
    return collector
