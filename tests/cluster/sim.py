"""A deterministic cluster simulator: N membership machines, a fake clock, a seeded RNG and an
in-memory network with loss, delay, duplication, partitions, crashes and stalls.

Everything runs in one thread from one event heap (FoundationDB-style), so a seed replays a run
exactly. By default packets go through the real codec (msgpack + HMAC), so sizes and
authentication are exercised; `wire=False` skips it for large benchmark runs.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cluster.codec import decode_packet, encode_packet
from cluster.config import ClusterConfig
from cluster.keyring import Keyring
from cluster.membership import EventKind, MemberEvent, Membership, Outbound
from cluster.messages import Address, Alive, MemberState, Message, PushPull

KEY = Keyring((b"simulated-cluster-key-0123456789",))


@dataclass
class SimNode:
    """One simulated host: its membership machine and what the simulator knows about it."""

    name: str
    addr: Address
    membership: Membership
    up: bool = True
    scheduled: float = float("inf")
    stalled_until: float = 0.0
    bytes_out: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    last_tick: float = -1.0
    ticks_at_same_time: int = 0
    # Optional extra machine fed the messages membership does not take (the election).
    extra: Any = None


@dataclass(order=True)
class _Ev:
    t: float
    seq: int
    kind: str = field(compare=False)
    data: Any = field(compare=False)


@dataclass
class Network:
    """Fault model: every datagram independently lost / duplicated; streams only partitioned."""

    loss: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.0005, 0.002)
    groups: dict[str, int] = field(default_factory=dict)
    blocked: set[tuple[str, str]] = field(default_factory=set)
    # Nodes no datagram reaches while streams still do (a firewall that drops UDP).
    deaf: set[str] = field(default_factory=set)
    # With probability `loss` a stream packet waits this long (TCP's 1 s initial retransmit
    # timeout after a lost SYN or segment). 0: streams are ideal, as before.
    stream_retry_s: float = 0.0

    def connected(self, a: str, b: str) -> bool:
        """Return whether a packet from a can reach b."""
        if (a, b) in self.blocked:
            return False
        return self.groups.get(a, 0) == self.groups.get(b, 0)


class Sim:
    """Drive N membership machines in simulated time."""

    def __init__(
        self,
        config: ClusterConfig,
        seed: int = 0,
        network: Network | None = None,
        wire: bool = True,
    ) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self.net = network or Network()
        self.wire = wire
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.by_addr: dict[Address, str] = {}
        self.log: list[tuple[float, str, MemberEvent]] = []
        self.on_event: Callable[[float, str, MemberEvent], None] | None = None
        # Called for every packet a running node sends: (now, src, dst or None, packet, copies
        # that will arrive: 0 when lost or cut off, 2 when duplicated).
        self.on_send: Callable[[float, str, str | None, Outbound, int], None] | None = None
        self._heap: list[_Ev] = []
        self._seq = 0
        self.delivered = 0
        self.dropped = 0

    # ------------------------------------------------------------------ setup

    def add_node(self, name: str, meta: bytes = b"", join: Iterable[str] = ()) -> SimNode:
        """Create a node now; it joins through the named seeds."""
        i = len(self.by_addr) + 1
        addr: Address = (f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 7946)
        m = Membership(self.config, name, addr, random.Random(self.rng.random()), self.now, meta)
        node = SimNode(name, addr, m)
        self.nodes[name] = node
        self.by_addr[addr] = name
        seeds = [self.nodes[s].addr for s in join]
        if seeds:
            self._send(node, m.join(seeds, self.now))
        self._reschedule(node)
        return node

    def add_cluster(self, n: int, prefix: str = "n") -> list[str]:
        """Add n nodes that all join through the first one; return their names."""
        width = len(str(n))
        names = [f"{prefix}{i:0{width}d}" for i in range(n)]
        self.add_node(names[0])
        for name in names[1:]:
            self.add_node(name, join=[names[0]])
        return names

    # ------------------------------------------------------------------ faults

    def crash(self, name: str) -> None:
        """Stop a node silently (kill -9): no more sends, receives or ticks."""
        self.nodes[name].up = False

    def restart(self, name: str, join: Iterable[str]) -> SimNode:
        """Bring a crashed node back as a fresh process (incarnation starts over)."""
        old = self.nodes[name]
        m = Membership(
            self.config,
            name,
            old.addr,
            random.Random(self.rng.random()),
            self.now,
            old.membership.meta,
        )
        node = SimNode(name, old.addr, m)
        self.nodes[name] = node
        self._send(node, m.join([self.nodes[s].addr for s in join], self.now))
        self._reschedule(node)
        return node

    def attach(self, name: str, machine: Any) -> None:
        """Give a node an extra machine (an Election) fed the messages membership declines."""
        node = self.nodes[name]
        node.extra = machine
        node.scheduled = self.now
        self._push(self.now, "tick", node)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: nodes in different groups cannot talk; unlisted nodes form group 0."""
        self.net.groups = {}
        for gi, group in enumerate(groups, 1):
            for name in group:
                self.net.groups[name] = gi

    def heal(self) -> None:
        """Remove every partition."""
        self.net.groups = {}
        self.net.blocked = set()

    def stall(self, name: str, duration: float) -> None:
        """Freeze a node's event loop: its packets and timers wait until the stall ends."""
        self.nodes[name].stalled_until = self.now + duration

    # ------------------------------------------------------------------ running

    def run_for(self, duration: float) -> None:
        """Advance simulated time by `duration`."""
        self.run_until(lambda: False, self.now + duration)

    def run_until(
        self, done: Callable[[], bool], deadline: float, check_every: float = 0.05
    ) -> bool:
        """Run until `done()` (checked every `check_every` s of simulated time) or `deadline`."""
        next_check = self.now
        while self._heap:
            if self.now >= next_check:
                if done():
                    return True
                next_check = self.now + check_every
            ev = self._heap[0]
            if ev.t > deadline:
                break
            heapq.heappop(self._heap)
            self.now = max(self.now, ev.t)
            self._dispatch(ev)
        self.now = max(self.now, deadline)
        return done()

    # ------------------------------------------------------------------ views

    def up_names(self) -> list[str]:
        """Return the names of running nodes."""
        return [n for n, node in self.nodes.items() if node.up]

    def view(self, observer: str) -> dict[str, MemberState]:
        """Return observer's state for every member it knows."""
        return {m.name: m.state for m in self.nodes[observer].membership.members()}

    def converged(self, names: Iterable[str] | None = None) -> bool:
        """Return whether every listed (default: running) node sees exactly them alive."""
        group = set(names) if names is not None else set(self.up_names())
        for n in group:
            v = self.view(n)
            alive = {k for k, s in v.items() if s == MemberState.ALIVE}
            if alive != group:
                return False
        return True

    def sees(self, observer: str, name: str, *states: MemberState) -> bool:
        """Return whether observer holds `name` in one of `states` (absent counts as reaped)."""
        m = self.nodes[observer].membership.member(name)
        return m is not None and m.state in states

    def events(
        self, kind: EventKind | None = None, about: str | None = None
    ) -> list[tuple[float, str, MemberEvent]]:
        """Return logged (time, observer, event) filtered by kind and subject."""
        return [
            (t, o, e)
            for t, o, e in self.log
            if (kind is None or e.kind == kind) and (about is None or e.name == about)
        ]

    # ------------------------------------------------------------------ internals

    def _push(self, t: float, kind: str, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, _Ev(t, self._seq, kind, data))

    def _reschedule(self, node: SimNode) -> None:
        t = max(node.membership.next_deadline(), self.now)
        if node.extra is not None:
            t = min(t, max(node.extra.next_deadline(), self.now))
        if t < node.scheduled or node.scheduled <= self.now:
            node.scheduled = t
            self._push(t, "tick", node)

    def _dispatch(self, ev: _Ev) -> None:
        if ev.kind == "tick":
            node: SimNode = ev.data
            if node is not self.nodes.get(node.name) or not node.up or ev.t != node.scheduled:
                return
            if node.stalled_until > self.now:
                node.scheduled = node.stalled_until
                self._push(node.stalled_until, "tick", node)
                return
            node.scheduled = float("inf")
            # A machine whose deadline never moves past `now` would spin here forever.
            if self.now == node.last_tick:
                node.ticks_at_same_time += 1
                if node.ticks_at_same_time > 1000:
                    raise RuntimeError(
                        f"{node.name}: next_deadline() is stuck at {self.now}: "
                        f"membership {node.membership.next_deadline()}, "
                        f"extra {node.extra.next_deadline() if node.extra else None}"
                    )
            else:
                node.last_tick, node.ticks_at_same_time = self.now, 0
            out = node.membership.tick(self.now)
            if node.extra is not None:
                out.extend(node.extra.tick(self.now))
            self._send(node, out)
            self._collect(node)
            self._reschedule(node)
        else:
            dst_name, src, payload, reliable = ev.data
            node = self.nodes.get(dst_name)  # type: ignore[assignment]
            if node is None or not node.up:
                self.dropped += 1
                return
            if node.stalled_until > self.now:
                self._push(node.stalled_until, "deliver", ev.data)
                return
            if self.wire:
                limit = self.config.max_stream_bytes if reliable else self.config.packet_bytes
                node.bytes_in += len(payload)
                msgs: list[Message] = decode_packet(payload, KEY, limit)
            else:
                msgs = list(payload)
            self.delivered += 1
            replies: list[Outbound] = []
            for msg in msgs:
                if node.extra is not None and node.extra.accepts(msg):
                    replies.extend(node.extra.handle(msg, src, self.now))
                else:
                    replies.extend(node.membership.handle(msg, src, self.now, reliable))
            self._send(node, replies)
            self._collect(node)
            self._reschedule(node)

    def _collect(self, node: SimNode) -> None:
        for e in node.membership.events():
            self.log.append((self.now, node.name, e))
            if self.on_event is not None:
                self.on_event(self.now, node.name, e)

    def _copies(self, src: str, dst: str | None, reliable: bool) -> int:
        """Return how many copies of one packet arrive (streams are only partitioned)."""
        if dst is None or not self.net.connected(src, dst):
            return 0
        if reliable:
            return 1
        if dst in self.net.deaf:
            return 0
        if self.rng.random() < self.net.loss:
            return 0
        if self.net.dup and self.rng.random() < self.net.dup:
            return 2
        return 1

    def _send(self, node: SimNode, out: list[Outbound]) -> None:
        if not node.up:
            return
        for ob in out:
            dst = self.by_addr.get(ob.addr)
            if self.wire:
                limit = self.config.max_stream_bytes if ob.reliable else self.config.packet_bytes
                payload: Any = encode_packet(ob.messages, KEY, limit)
                node.bytes_out += len(payload)
            else:
                payload = ob.messages
            node.packets_out += 1
            copies = self._copies(node.name, dst, ob.reliable)
            if self.on_send is not None:
                self.on_send(self.now, node.name, dst, ob, copies)
            if not copies:
                self.dropped += 1
            for _ in range(copies):
                lo, hi = self.net.delay
                delay = lo + (hi - lo) * self.rng.random()
                if ob.reliable and self.net.stream_retry_s and self.rng.random() < self.net.loss:
                    delay += self.net.stream_retry_s
                self._push(self.now + delay, "deliver", (dst, node.addr, payload, ob.reliable))


@dataclass
class ChangeTracker:
    """Follow one metadata change of `origin` through a simulated cluster.

    Counts the copies of the change each node sends and receives (datagrams and push-pull
    states), what packet each datagram copy rode on, when the first datagram copy was sent to
    each node (it arrives a few ms later) and when each node learned it. Times are relative to
    the change.
    """

    sim: Sim
    origin: str
    meta: bytes
    t0: float
    learned: dict[str, float] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    pushed: Counter[str] = field(default_factory=Counter)
    carriers: Counter[str] = field(default_factory=Counter)
    first_copy: dict[str, float] = field(default_factory=dict)
    gossip_end: float | None = None
    missed_by_gossip: frozenset[str] = frozenset()

    @classmethod
    def start(cls, sim: Sim, origin: str, meta: bytes) -> ChangeTracker:
        """Change origin's metadata now and start following it (replaces the sim's hooks)."""
        tracker = cls(sim, origin, meta, sim.now)
        tracker.learned[origin] = 0.0
        sim.on_event = tracker.on_event
        sim.on_send = tracker.on_send
        sim.nodes[origin].membership.set_meta(meta, sim.now)
        return tracker

    def stop(self) -> None:
        """Remove the hooks."""
        self.sim.on_event = None
        self.sim.on_send = None

    def on_event(self, now: float, observer: str, e: MemberEvent) -> None:
        """Note when `observer` first holds the new metadata."""
        if e.name == self.origin and e.meta == self.meta and observer not in self.learned:
            self.learned[observer] = now - self.t0

    def on_send(self, now: float, src: str, dst: str | None, ob: Outbound, copies: int) -> None:
        """Count the copies of the change in one packet."""
        for msg in ob.messages:
            if isinstance(msg, PushPull):
                if any(r.name == self.origin and r.meta == self.meta for r in msg.states):
                    self.pushed[dst or "?"] += copies
            elif isinstance(msg, Alive) and msg.node == self.origin and msg.meta == self.meta:
                self.sent[src] += 1
                self.received[dst or "?"] += copies
                if copies and dst is not None:
                    self.first_copy.setdefault(dst, now - self.t0)
                # A packet led by a broadcast is a gossip packet; else it rides on a probe.
                lead = ob.messages[0]
                self.carriers["gossip" if lead is msg else type(lead).__name__] += 1

    def everyone_knows(self) -> bool:
        """Return whether every running node holds the new metadata."""
        return all(n in self.learned for n in self.sim.up_names())

    def queued_anywhere(self) -> bool:
        """Return whether some running node still has the change in its broadcast queue."""
        return any(
            key == self.origin and isinstance(msg, Alive) and msg.meta == self.meta
            for name in self.sim.up_names()
            for key, msg, _ in self.sim.nodes[name].membership.broadcasts.pending()
        )

    def watch(self) -> bool:
        """Return everyone_knows(); note who the gossip missed when the last queue lets go.

        Pass it to `Sim.run_until` as the stop condition, then `drained` to run on until the
        gossip is over (everyone may know before the last copies are sent).
        """
        if self.gossip_end is None and not self.queued_anywhere():
            self.gossip_end = self.sim.now - self.t0
            self.missed_by_gossip = frozenset(
                n for n in self.sim.up_names() if n not in self.learned
            )
        return self.everyone_knows()

    def drained(self) -> bool:
        """Return whether the gossip of the change is over (noting who it missed)."""
        self.watch()
        return self.gossip_end is not None
