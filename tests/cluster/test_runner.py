"""ClusterRunner over real sockets on 127.0.0.1: several runners in one process and event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cluster.codec import encode_packet
from cluster.config import ClusterConfig, local
from cluster.election import MemoryTermStore
from cluster.keyring import Keyring
from cluster.membership import EventKind
from cluster.messages import MemberState, Ping
from cluster.meta import DeviceMeta, ModelMeta, NodeMeta
from cluster.runner import ClusterEvent, ClusterRunner
from cluster.udp import frame
from tests.support import wait_for

KEY = Keyring((b"runner-test-cluster-key-01234567",))
WRONG = Keyring((b"some-other-clusters-key-76543210",))
LOCAL = dataclasses.replace(local(), bind="127.0.0.1:0")


def states(r: ClusterRunner) -> dict[str, MemberState]:
    return {m.name: m.state for m in r.members()}


def alive(r: ClusterRunner) -> set[str]:
    return {n for n, s in states(r).items() if s == MemberState.ALIVE}


class Cluster:
    """Runners started in this loop, stopped at teardown."""

    def __init__(self) -> None:
        self.runners: dict[str, ClusterRunner] = {}

    async def add(
        self,
        name: str,
        config: ClusterConfig = LOCAL,
        meta: Callable[[], NodeMeta] | None = None,
        **kw: Any,
    ) -> ClusterRunner:
        if self.runners and not config.seeds:
            seed = next(iter(self.runners.values())).addr
            config = dataclasses.replace(config, seeds=(f"{seed[0]}:{seed[1]}",))
        r = ClusterRunner(config, name, KEY, MemoryTermStore(), meta, **kw)
        await r.start()
        self.runners[name] = r
        return r

    def converged(self, names: set[str] | None = None) -> bool:
        group = names if names is not None else set(self.runners)
        return all(alive(self.runners[n]) == group for n in group)

    async def close(self) -> None:
        for r in self.runners.values():
            await r.stop()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


async def test_five_runners_in_one_process_converge_with_their_metadata(cluster: Cluster) -> None:
    for i in range(5):
        meta = NodeMeta(loaded=(ModelMeta(f"model-{i}"),), peer=f"127.0.0.1:{7300 + i}")

        def provider(meta: NodeMeta = meta) -> NodeMeta:
            return meta

        await cluster.add(f"n{i}", meta=provider)
    await wait_for(cluster.converged, what="5 nodes seeing 5 alive", timeout=10.0)
    view = {m.name: m for m in cluster.runners["n3"].members()}
    assert view["n1"].meta is not None
    assert view["n1"].meta.model_names == {"model-1"}
    assert view["n4"].meta is not None and view["n4"].meta.peer == "127.0.0.1:7304"
    # Push-pull over TCP ran (the join), and both directions of UDP carried traffic.
    r = cluster.runners["n0"]
    assert r.membership.counters.push_pulls + r.traffic.packets_in > 0
    assert r.traffic.bytes_in > 0 and r.traffic.bytes_out > 0


async def test_a_silent_runner_is_declared_dead_and_a_leaving_one_is_left(
    cluster: Cluster,
) -> None:
    for i in range(5):
        await cluster.add(f"n{i}")
    await wait_for(cluster.converged, what="convergence", timeout=10.0)
    await cluster.runners["n4"].stop()  # no goodbye, like kill -9
    assert await cluster.runners["n3"].leave(timeout=5.0)
    rest = ["n0", "n1", "n2"]
    await wait_for(
        lambda: all(
            states(cluster.runners[o]).get("n4") == MemberState.DEAD
            and states(cluster.runners[o]).get("n3") == MemberState.LEFT
            for o in rest
        ),
        timeout=15.0,
        what="n4 dead and n3 left everywhere",
    )
    assert not cluster.runners["n3"].is_primary()


def fresh_view(r: ClusterRunner) -> list[tuple[str, MemberState, int, bytes]]:
    """What the state machine says now, read past the runner's cached view."""
    return sorted((v.name, v.state, v.incarnation, v.meta) for v in r.membership.members())


def cached_view(r: ClusterRunner) -> list[tuple[str, MemberState, int, bytes]]:
    out = []
    for m in r.members():
        raw = r.membership.member(m.name)
        assert raw is not None
        out.append((m.name, m.state, m.incarnation, raw.meta))
        assert (m.meta is None) == (not raw.meta)
    return sorted(out)


async def test_the_members_a_runner_reports_always_match_its_state_machine(
    cluster: Cluster,
) -> None:
    models: dict[str, tuple[ModelMeta, ...]] = {}
    for i in range(4):
        name = f"n{i}"

        def provider(name: str = name) -> NodeMeta:
            return NodeMeta(loaded=models.get(name, ()))

        await cluster.add(name, meta=provider)
    checks = 0

    async def watch(seconds: float) -> None:
        # Read the view between steps, as forwarding does, while joins, metadata changes
        # and a death move the machines underneath.
        nonlocal checks
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            for r in cluster.runners.values():
                if not r._stopped:
                    assert cached_view(r) == fresh_view(r)
                    checks += 1
            await asyncio.sleep(0.005)

    await asyncio.gather(wait_for(cluster.converged, what="convergence", timeout=10.0), watch(1.0))
    models["n1"] = (ModelMeta("m", 1),)
    await watch(1.0)
    await cluster.runners["n3"].stop()
    await watch(1.0)
    assert checks > 300


async def test_metadata_changes_reach_the_peers(cluster: Cluster) -> None:
    current = NodeMeta(devices=(DeviceMeta("cuda:0", 1000, 900, 0),))
    a = await cluster.add("a", meta=lambda: current)
    b = await cluster.add("b")
    await wait_for(cluster.converged, timeout=10.0)
    current = dataclasses.replace(current, loaded=(ModelMeta("m", 2),))

    def b_sees_m() -> bool:
        seen = b.member("a")
        return seen is not None and seen.meta is not None and seen.meta.queue_of("m") == 2

    await wait_for(b_sees_m, what="b seeing a's new model", timeout=10.0)
    assert a.membership.incarnation > 1


async def test_member_events_reach_the_hook_with_decoded_metadata(cluster: Cluster) -> None:
    events: list[ClusterEvent] = []
    await cluster.add("a", on_event=events.append)
    await cluster.add("b", meta=lambda: NodeMeta(http="127.0.0.1:8008"))
    await wait_for(
        lambda: any(e.kind == EventKind.JOINED and e.name == "b" for e in events), timeout=10.0
    )
    joined = next(e for e in events if e.name == "b")
    assert joined.meta is not None and joined.meta.http == "127.0.0.1:8008"


def _send_raw(addr: tuple[str, int], payloads: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in payloads:
            s.sendto(p, addr)


async def test_unsigned_forged_garbage_and_oversized_datagrams_are_counted_and_dropped(
    cluster: Cluster,
) -> None:
    a = await cluster.add("a")
    b = await cluster.add("b")
    await wait_for(cluster.converged, timeout=10.0)
    ping = [Ping(1, "a", "mallory")]
    _send_raw(
        a.addr,
        [
            encode_packet(ping, Keyring(()), 1400),  # unsigned
            encode_packet(ping, WRONG, 1400),  # signed with another cluster's key
            encode_packet(ping, WRONG, 1400),
            b"\x00garbage",
            b"\xc5\x01\x01" + b"x" * 2000,  # over the 1400-byte datagram limit
        ],
    )
    # And a stream frame cut short, then one too large to read.
    for bad in (frame(b"\xc5\x01")[:-1], (10**9).to_bytes(4, "big")):
        _, w = await asyncio.open_connection(*a.addr)
        w.write(bad)
        await w.drain()
        w.close()
    await wait_for(
        lambda: (
            a.dropped().get("unauthenticated", 0) == 3
            and a.dropped().get("malformed", 0) == 2
            and a.dropped().get("oversized", 0) == 2
        ),
        what="drop counters",
        timeout=10.0,
    )
    # Nothing of it reached the machines or broke the loop: b still gets acks.
    probes = b.membership.counters.probes
    await wait_for(lambda: b.membership.counters.probes > probes + 2, timeout=10.0)
    assert b.membership.counters.probe_failures == 0
    assert "mallory" not in states(a)


async def test_three_voters_over_real_sockets_elect_exactly_one_primary(cluster: Cluster) -> None:
    config = dataclasses.replace(LOCAL, voters=("v0", "v1", "v2"))
    for i in range(3):
        await cluster.add(f"v{i}", config=config)
    rs = list(cluster.runners.values())
    await wait_for(lambda: sum(r.is_primary() for r in rs) == 1, what="one primary", timeout=10.0)
    # Hold for several lease lengths: never two acting, and every view names the same one.
    loop = asyncio.get_running_loop()
    end = loop.time() + 3 * config.lease_s
    agreed = False
    while loop.time() < end:
        assert sum(r.is_primary() for r in rs) <= 1
        views = {r.primary() for r in rs}
        agreed = agreed or (len(views) == 1 and None not in views)
        await asyncio.sleep(0.01)
    assert agreed
    (primary,) = [r for r in rs if r.is_primary()]
    term = primary.election.term
    assert term >= 1
    # The fences of the other voters know the term: an older command is refused.
    await wait_for(lambda: all(r.fence.highest >= term for r in rs), timeout=10.0)
    assert not rs[0].fence.admit(term - 1)
    assert rs[0].fence.admit(term)


async def test_metrics_report_members_primary_and_traffic(cluster: Cluster) -> None:
    registry = CollectorRegistry()
    a = await cluster.add("a", registry=registry)
    await cluster.add("b")
    await wait_for(cluster.converged, timeout=10.0)
    _send_raw(a.addr, [b"\x00junk"])
    await wait_for(lambda: a.dropped().get("malformed", 0) == 1, timeout=10.0)
    text = generate_latest(registry).decode()
    assert 'moc_cluster_members{state="alive"} 2.0' in text
    assert "moc_cluster_primary 0.0" in text
    assert 'moc_gossip_messages_dropped_total{reason="malformed"} 1.0' in text
    for name in (
        'moc_gossip_bytes_total{direction="in"}',
        'moc_gossip_packets_total{direction="out"}',
        "moc_cluster_term",
        "moc_cluster_elections_total",
        "moc_gossip_suspicions_total",
        "moc_gossip_refutes_total",
    ):
        assert name in text
    await a.stop()
    assert "moc_cluster_members" not in generate_latest(registry).decode()


async def test_random_and_signed_nonsense_never_stops_the_loop(cluster: Cluster) -> None:
    import random

    from cluster.messages import Alive, IndirectPing

    a = await cluster.add("a")
    b = await cluster.add("b")
    await wait_for(cluster.converged, timeout=10.0)
    rng = random.Random(4)
    junk = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) for _ in range(200)]
    # Correctly signed headers over random bodies reach msgpack and the field checks.
    header = b"\xc5\x01\x01"
    signed = [header + KEY.sign(header + body) + body for body in junk[:100]]
    # Well-formed, signed, but pointing at a host name: must not make sendto resolve it.
    odd = [
        encode_packet([IndirectPing(9, "x", ("no-such-host.invalid", 9), True, "m")], KEY, 1400),
        encode_packet([Alive(5, "ghost", ("no-such-host.invalid", 9), b"\xc1")], KEY, 1400),
    ]
    payloads = junk + signed

    def decode_drops() -> int:
        d = a.dropped()
        return sum(d.get(r, 0) for r in ("malformed", "version", "unauthenticated", "oversized"))

    # In batches, so the kernel's socket buffer never overflows and every datagram arrives.
    for i in range(0, len(payloads), 25):
        batch = payloads[i : i + 25]
        sent = i + len(batch)
        _send_raw(a.addr, batch)
        await wait_for(lambda sent=sent: decode_drops() >= sent, what=f"{sent} drops", timeout=10.0)
    assert decode_drops() == len(payloads)
    _send_raw(a.addr, odd)
    await wait_for(
        lambda: a.dropped().get("bad_address", 0) >= 1, what="the host name refused", timeout=10.0
    )
    # The ghost's metadata is garbage: it is listed without metadata, counted once.
    await wait_for(lambda: a.member("ghost") is not None, timeout=10.0)
    ghost = a.member("ghost")
    assert ghost is not None and ghost.meta is None
    assert a.dropped().get("bad_meta") == 1
    probes = b.membership.counters.probes
    await wait_for(lambda: b.membership.counters.probes > probes + 2, timeout=10.0)
    assert states(b)["a"] == MemberState.ALIVE


async def test_a_message_a_machine_cannot_handle_is_counted_and_nothing_escapes_to_the_loop(
    cluster: Cluster,
) -> None:
    from cluster.messages import Suspect

    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        escaped.append(context)

    loop.set_exception_handler(handler)
    try:
        a = await cluster.add("a")
        b = await cluster.add("b")
        await wait_for(cluster.converged, timeout=10.0)
        # A signed, well formed message that the state machine fails on (a bug's stand-in).
        real_handle = a.membership.handle

        def failing_handle(msg: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(msg, Suspect) and msg.accuser == "mallory":
                raise RuntimeError("a bug in the state machine")
            return real_handle(msg, *args, **kwargs)

        a.membership.handle = failing_handle  # type: ignore[method-assign]
        _send_raw(a.addr, [encode_packet([Suspect(1, "a", "mallory")], KEY, 1400)])
        await wait_for(
            lambda: a.dropped().get("handler_error", 0) == 1, what="handler_error", timeout=10.0
        )
        # A local record the wire cannot carry (2**64): push-pulls either way fail to encode it,
        # counted, not raised in a task.
        a.membership._local.incarnation = 2**64
        await wait_for(
            lambda: a.dropped().get("unsendable", 0) >= 2,
            what="unsendable push-pulls",
            timeout=10.0,
        )
        probes = b.membership.counters.probes
        await wait_for(lambda: b.membership.counters.probes > probes + 2, timeout=10.0)
        assert b.membership.counters.probe_failures == 0
    finally:
        loop.set_exception_handler(None)
    assert escaped == []
