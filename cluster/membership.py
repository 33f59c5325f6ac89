"""SWIM + Lifeguard membership as a sans-I/O state machine (after hashicorp/memberlist state.go).

Rule 1: nothing here touches a socket, a clock or a global RNG. The caller feeds messages with
`handle(msg, src, now)` and calls `tick(now)` at or after `next_deadline()`; both return the
`Outbound` packets to send. An RNG is passed in.

Rule 2: the caller owns transport semantics. `Outbound.reliable` asks for the stream channel
(TCP push-pull, fallback ping); a reliable message's replies are addressed to its `src` and
must go back on the same stream.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster.awareness import Awareness
from cluster.broadcast import BroadcastQueue
from cluster.codec import PACKET_OVERHEAD, message_size
from cluster.config import ClusterConfig
from cluster.errors import LocalUsageError
from cluster.messages import (
    Ack,
    Address,
    Alive,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    Nack,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
)
from cluster.suspicion import Suspicion

__all__ = [
    "MAX_INCARNATION",
    "Counters",
    "EventKind",
    "MemberEvent",
    "Membership",
    "MemberView",
    "Outbound",
    "Rng",
]

MAX_INCARNATION = 2**64 - 1
"""The largest incarnation the wire (msgpack, unsigned 64 bits) carries."""


class Rng(Protocol):
    """The slice of `random.Random` the state machines use."""

    def random(self) -> float:
        """Return a float in [0, 1)."""
        ...

    def shuffle(self, x: list[Any]) -> None:
        """Shuffle a list in place."""
        ...


@dataclass(frozen=True, slots=True)
class Outbound:
    """One packet to send: its messages go in one datagram (or one stream frame if reliable)."""

    addr: Address
    messages: tuple[Message, ...]
    reliable: bool = False


class EventKind(enum.Enum):
    """What happened to a member, for the node to react to."""

    JOINED = "joined"
    UPDATED = "updated"
    SUSPECT = "suspect"
    ALIVE = "alive"
    DEAD = "dead"
    LEFT = "left"
    REAPED = "reaped"


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change in the membership view."""

    kind: EventKind
    name: str
    addr: Address
    incarnation: int
    meta: bytes


@dataclass(frozen=True, slots=True)
class MemberView:
    """A read-only snapshot of one member."""

    name: str
    addr: Address
    incarnation: int
    state: MemberState
    meta: bytes
    state_change: float


@dataclass(slots=True)
class _Member:
    name: str
    addr: Address
    incarnation: int
    state: MemberState
    meta: bytes
    state_change: float

    def view(self) -> MemberView:
        return MemberView(
            self.name, self.addr, self.incarnation, self.state, self.meta, self.state_change
        )


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    started: float
    timeout_at: float
    deadline: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: Address
    orig_seq: int
    nack: bool
    timeout_at: float


@dataclass(slots=True)
class Counters:
    """Monotonic counts for metrics; the metrics module reads them, nothing resets them."""

    probes: int = 0
    probe_failures: int = 0
    suspicions: int = 0
    refutes: int = 0
    deaths_declared: int = 0
    push_pulls: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        """Count one dropped message under `reason`."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


_DEAD_OR_LEFT = (MemberState.DEAD, MemberState.LEFT)


class Membership:
    """One node's view of the cluster and the protocol that keeps it current."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        addr: Address,
        rng: Rng,
        now: float,
        meta: bytes = b"",
    ) -> None:
        if len(meta) > config.max_meta_bytes:
            raise LocalUsageError(f"metadata of {len(meta)} bytes > {config.max_meta_bytes}")
        self.config = config
        self.name = name
        self.addr = addr
        self.rng = rng
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue(config.retransmit_mult, config.retransmit_base)
        self.counters = Counters()
        self._members: dict[str, _Member] = {}
        self._local = _Member(name, addr, 1, MemberState.ALIVE, meta, now)
        self._members[name] = self._local
        self._suspicions: dict[str, Suspicion] = {}
        self._events: list[MemberEvent] = []
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._leaving = False
        self._seeds: tuple[Address, ...] = ()
        self._tombstones: dict[str, tuple[Address, float]] = {}
        # Tickers start at random offsets so nodes started together do not beat in step.
        self._next_probe_at = now + rng.random() * config.probe_interval_s
        self._next_gossip_at = now + rng.random() * config.gossip_interval_s
        self._next_push_pull_at = now + rng.random() * max(config.push_pull_interval_s, 0.001)
        self._next_join_at = float("inf")
        self._queue_alive(self._local)

    # ------------------------------------------------------------------ public API

    @property
    def incarnation(self) -> int:
        """Return this node's current incarnation."""
        return self._local.incarnation

    @property
    def meta(self) -> bytes:
        """Return this node's current metadata."""
        return self._local.meta

    @property
    def leaving(self) -> bool:
        """Return whether `leave` was called."""
        return self._leaving

    def members(self) -> list[MemberView]:
        """Return a snapshot of every known member, this node included."""
        return [m.view() for m in self._members.values()]

    def member(self, name: str) -> MemberView | None:
        """Return one member's snapshot, or None if unknown."""
        m = self._members.get(name)
        return m.view() if m is not None else None

    def events(self) -> list[MemberEvent]:
        """Return and clear the events since the last call."""
        events, self._events = self._events, []
        return events

    def join(self, seeds: Sequence[Address], now: float) -> list[Outbound]:
        """Send a join push-pull to every seed; retried while this node knows no live peer."""
        self._seeds = tuple(s for s in seeds if s != self.addr)
        self._next_join_at = now + self._join_retry_s()
        return self._join_packets()

    def leave(self, now: float) -> list[Outbound]:
        """Announce a graceful leave; keep ticking until `leave_broadcast_done()` or a timeout."""
        self._leaving = True
        out: list[Outbound] = []
        self._on_dead(Dead(self._local.incarnation, self.name, self.name), now, out)
        # Push the news straight to a few peers instead of waiting for the gossip tick.
        self._gossip(now, out)
        return out

    def leave_broadcast_done(self) -> bool:
        """Return whether our leave message has used up its retransmits."""
        return not any(key == self.name for key, _, _ in self.broadcasts.pending())

    def set_meta(self, meta: bytes, now: float) -> None:
        """Replace this node's metadata and gossip it (bumps the incarnation)."""
        if len(meta) > self.config.max_meta_bytes:
            raise LocalUsageError(f"metadata of {len(meta)} bytes > {self.config.max_meta_bytes}")
        if meta == self._local.meta:
            return
        self._local.meta = meta
        self._local.incarnation += 1
        self._queue_alive(self._local)

    def handle(
        self, msg: Message, src: Address, now: float, reliable: bool = False
    ) -> list[Outbound]:
        """Process one received message and return what to send in response."""
        out: list[Outbound] = []
        if isinstance(msg, Ping):
            self._on_ping(msg, src, reliable, out)
        elif isinstance(msg, Ack):
            self._on_ack(msg, now, out)
        elif isinstance(msg, Nack):
            if self._probe is not None and self._probe.seq == msg.seq:
                self._probe.nacks += 1
            else:
                self.counters.drop("stale")
        elif isinstance(msg, IndirectPing):
            self._on_indirect_ping(msg, src, now, out)
        elif isinstance(msg, Alive):
            if len(msg.meta) > self.config.max_meta_bytes:
                self.counters.drop("meta_too_large")
            else:
                self._on_alive(msg, now, out)
        elif isinstance(msg, Suspect):
            self._on_suspect(msg, now, out)
        elif isinstance(msg, Dead):
            self._on_dead(msg, now, out)
        elif isinstance(msg, PushPull):
            self._on_push_pull(msg, src, now, out)
        else:
            # Election messages share the wire; the caller routes them elsewhere.
            self.counters.drop("not_membership")
        return out

    def tick(self, now: float) -> list[Outbound]:
        """Run every timer that is due and return the packets to send."""
        out: list[Outbound] = []
        for name in [n for n, s in self._suspicions.items() if s.expired(now)]:
            m = self._members[name]
            self._on_dead(Dead(m.incarnation, name, self.name), now, out)
            self.counters.deaths_declared += 1
        for seq in [s for s, r in self._relays.items() if now >= r.timeout_at]:
            relay = self._relays.pop(seq)
            if relay.nack:
                out.append(self._packet(relay.requester, [Nack(relay.orig_seq)]))
        if not self._leaving:
            self._tick_probe(now, out)
        if now >= self._next_gossip_at:
            self._gossip(now, out)
            self._next_gossip_at = _advance(
                self._next_gossip_at, self.config.gossip_interval_s, now
            )
        if (
            not self._leaving
            and self.config.push_pull_interval_s > 0
            and now >= self._next_push_pull_at
        ):
            self._push_pull_round(now, out)
            interval = self.config.push_pull_scaled_s(len(self._members))
            self._next_push_pull_at = _advance(self._next_push_pull_at, interval, now)
        if self._seeds and now >= self._next_join_at:
            self._next_join_at = now + self._join_retry_s()
            if not self._leaving and not any(
                m.state == MemberState.ALIVE for m in self._members.values() if m is not self._local
            ):
                out.extend(self._join_packets())
        return out

    def next_deadline(self) -> float:
        """Return the earliest time `tick` has work to do."""
        t = min(self._next_gossip_at, self._next_join_at)
        if not self._leaving:
            t = min(t, self._next_probe_at)
            if self.config.push_pull_interval_s > 0:
                t = min(t, self._next_push_pull_at)
        p = self._probe
        if p is not None:
            t = min(t, p.deadline if p.indirect_sent else p.timeout_at)
        for s in self._suspicions.values():
            t = min(t, s.deadline)
        for r in self._relays.values():
            t = min(t, r.timeout_at)
        return t

    def local_state(self) -> list[PushNodeState]:
        """Return the full state as sent in a push-pull."""
        return [
            PushNodeState(m.name, m.addr, m.incarnation, int(m.state), m.meta)
            for m in self._members.values()
        ]

    # ------------------------------------------------------------------ probing

    def _tick_probe(self, now: float, out: list[Outbound]) -> None:
        p = self._probe
        if p is not None and not p.indirect_sent and now >= p.timeout_at:
            self._send_indirect(p, out)
        if p is not None and now >= p.deadline:
            self._probe_failed(p, now, out)
            p = None
        if p is None and now >= self._next_probe_at:
            self._start_probe(now, out)

    def _start_probe(self, now: float, out: list[Outbound]) -> None:
        interval = self.awareness.scale(self.config.probe_interval_s)
        self._next_probe_at = _advance(self._next_probe_at, interval, now)
        target = self._next_probe_target()
        if target is None:
            return
        self.counters.probes += 1
        seq = self._next_seq()
        msgs: list[Message] = [Ping(seq, target.name, self.name)]
        # A suspect learns of the accusation with the probe itself, so it can refute at once.
        if target.state == MemberState.SUSPECT:
            msgs.append(Suspect(target.incarnation, target.name, self.name))
        out.append(self._packet(target.addr, msgs))
        self._probe = _Probe(
            target.name, seq, now, now + self.config.probe_timeout_s, now + interval
        )

    def _send_indirect(self, p: _Probe, out: list[Outbound]) -> None:
        p.indirect_sent = True
        target = self._members.get(p.target)
        if target is None:
            return
        peers = self._random_members(
            self.config.indirect_checks,
            lambda m: m.state == MemberState.ALIVE and m.name not in (self.name, p.target),
        )
        req = IndirectPing(p.seq, target.name, target.addr, True, self.name)
        for peer in peers:
            out.append(self._packet(peer.addr, [req]))
        p.expected_nacks = len(peers)
        if self.config.tcp_fallback:
            out.append(Outbound(target.addr, (Ping(p.seq, target.name, self.name),), True))

    def _probe_failed(self, p: _Probe, now: float, out: list[Outbound]) -> None:
        self._probe = None
        self.counters.probe_failures += 1
        # Missing nacks mean our own network may be the problem: raise the health score.
        if p.expected_nacks > 0:
            self.awareness.apply_delta(max(p.expected_nacks - p.nacks, 0))
        else:
            self.awareness.apply_delta(1)
        target = self._members.get(p.target)
        if target is not None:
            self._on_suspect(Suspect(target.incarnation, target.name, self.name), now, out)

    def _next_probe_target(self) -> _Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                name = self._probe_order[self._probe_index]
                self._probe_index += 1
                m = self._members.get(name)
                if m is not None and m is not self._local and m.state not in _DEAD_OR_LEFT:
                    return m
            self._reset_probe_order()
        return None

    def _reset_probe_order(self) -> None:
        self._probe_order = [n for n in self._members if n != self.name]
        self.rng.shuffle(self._probe_order)
        self._probe_index = 0

    def _on_ping(self, msg: Ping, src: Address, reliable: bool, out: list[Outbound]) -> None:
        if msg.target and msg.target != self.name:
            self.counters.drop("misdirected")
            return
        reply: list[Message] = [Ack(msg.seq)]
        # A pinger we suspect hears about it in our ack and can refute, instead of waiting
        # for our probe round to come back to it (its suspicion broadcasts may have been lost).
        pinger = self._members.get(msg.source)
        if pinger is not None and pinger.state == MemberState.SUSPECT:
            reply.append(Suspect(pinger.incarnation, pinger.name, self.name))
        if reliable:
            out.append(Outbound(src, tuple(reply), True))
        else:
            out.append(self._packet(src, reply))

    def _on_ack(self, msg: Ack, now: float, out: list[Outbound]) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq:
            self._probe = None
            if not p.indirect_sent:
                self.awareness.apply_delta(-1)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            out.append(self._packet(relay.requester, [Ack(relay.orig_seq)]))
            return
        self.counters.drop("stale")

    def _on_indirect_ping(
        self, msg: IndirectPing, src: Address, now: float, out: list[Outbound]
    ) -> None:
        seq = self._next_seq()
        self._relays[seq] = _Relay(src, msg.seq, msg.nack, now + self.config.probe_timeout_s)
        out.append(self._packet(msg.target_addr, [Ping(seq, msg.target, self.name)]))

    # ------------------------------------------------------------------ state changes

    def _on_alive(self, a: Alive, now: float, out: list[Outbound]) -> None:
        if a.node == self.name:
            local = self._local
            newer = a.incarnation > local.incarnation
            differs = a.incarnation == local.incarnation and (
                a.meta != local.meta or a.addr != local.addr
            )
            if (newer or differs) and not self._leaving:
                # Someone speaks for us with newer or different data (we restarted): refute.
                self._refute(a.incarnation)
            return
        m = self._members.get(a.node)
        if m is None:
            m = _Member(a.node, a.addr, a.incarnation, MemberState.ALIVE, a.meta, now)
            self._members[a.node] = m
            self._tombstones.pop(a.node, None)
            self._insert_probe_target(a.node)
            self._queue(a.node, a)
            self._emit(EventKind.JOINED, m)
            return
        if a.incarnation <= m.incarnation:
            self.counters.drop("stale")
            return
        was = m.state
        changed = a.meta != m.meta or a.addr != m.addr
        m.incarnation = a.incarnation
        m.meta = a.meta
        m.addr = a.addr
        if was != MemberState.ALIVE:
            m.state = MemberState.ALIVE
            m.state_change = now
            self._suspicions.pop(a.node, None)
        self._queue(a.node, a)
        if was in _DEAD_OR_LEFT:
            self._emit(EventKind.JOINED, m)
        elif was == MemberState.SUSPECT:
            self._emit(EventKind.ALIVE, m)
            if changed:
                self._emit(EventKind.UPDATED, m)
        elif changed:
            self._emit(EventKind.UPDATED, m)

    def _on_suspect(self, s: Suspect, now: float, out: list[Outbound]) -> None:
        m = self._members.get(s.node)
        if m is None:
            return
        if s.incarnation < m.incarnation:
            self.counters.drop("stale")
            return
        timer = self._suspicions.get(s.node)
        if timer is not None:
            if timer.confirm(s.accuser, now):
                self._queue(s.node, s)
            return
        if m.state != MemberState.ALIVE:
            return
        if m is self._local:
            if not self._leaving:
                self._refute(s.incarnation)
            return
        self.counters.suspicions += 1
        self._queue(s.node, s)
        m.incarnation = s.incarnation
        m.state = MemberState.SUSPECT
        m.state_change = now
        n = len(self._members)
        # Expect confirmations from mult - 2 peers, unless too few peers could confirm.
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        min_s = self.config.suspicion_min_s(n)
        max_s = self.config.suspicion_max_timeout_mult * min_s
        self._suspicions[s.node] = Suspicion(s.accuser, k, min_s, max_s, now)
        self._emit(EventKind.SUSPECT, m)

    def _on_dead(self, d: Dead, now: float, out: list[Outbound]) -> None:
        m = self._members.get(d.node)
        if m is None:
            return
        if d.incarnation < m.incarnation:
            self.counters.drop("stale")
            return
        if m.state in _DEAD_OR_LEFT:
            return
        if m is self._local and not self._leaving:
            self._refute(d.incarnation)
            return
        self._queue(d.node, d)
        m.incarnation = d.incarnation
        m.state = MemberState.LEFT if d.node == d.accuser else MemberState.DEAD
        m.state_change = now
        self._suspicions.pop(d.node, None)
        self._tombstones[d.node] = (m.addr, now)
        self._emit(EventKind.LEFT if m.state == MemberState.LEFT else EventKind.DEAD, m)

    def _refute(self, accused: int) -> None:
        if accused >= MAX_INCARNATION:
            # Nothing the wire can carry outranks it (only a key holder can send one): refusing
            # it keeps this node able to speak, where refuting would make it unencodable.
            self.counters.drop("unrefutable")
            return
        inc = self._local.incarnation + 1
        if accused >= inc:
            inc = accused + 1
        self._local.incarnation = inc
        self.counters.refutes += 1
        # Being accused is evidence that our own links or scheduling are slow.
        self.awareness.apply_delta(1)
        self._queue_alive(self._local)

    # ------------------------------------------------------------------ gossip and sync

    def _gossip(self, now: float, out: list[Outbound]) -> None:
        if not len(self.broadcasts):
            return
        window = self.config.gossip_to_the_dead_s

        def eligible(m: _Member) -> bool:
            # Alive, suspect (it may refute) and recently dead members (they may learn of it
            # and refute), as memberlist's gossip(); a member that left will not pass it on.
            if m is self._local or m.state == MemberState.LEFT:
                return False
            if m.state == MemberState.DEAD:
                return now - m.state_change < window
            return True

        budget = self.config.packet_bytes - PACKET_OVERHEAD
        for peer in self._random_members(self.config.gossip_nodes, eligible):
            msgs = self.broadcasts.take(budget, len(self._members))
            if not msgs:
                break
            out.append(Outbound(peer.addr, tuple(msgs)))

    def _push_pull_round(self, now: float, out: list[Outbound]) -> None:
        self._reap(now)
        peers = self._random_members(
            1, lambda m: m is not self._local and m.state == MemberState.ALIVE
        )
        states = tuple(self.local_state())
        for peer in peers:
            self.counters.push_pulls += 1
            out.append(Outbound(peer.addr, (PushPull(False, False, self.name, states),), True))
        # Also try one member we believe failed: if it is back (a healed partition), the
        # exchange merges the two views again (Serf's reconnect).
        if self._tombstones:
            names = sorted(self._tombstones)
            name = names[int(self.rng.random() * len(names))]
            addr, _ = self._tombstones[name]
            out.append(Outbound(addr, (PushPull(False, False, self.name, states),), True))

    def _on_push_pull(self, msg: PushPull, src: Address, now: float, out: list[Outbound]) -> None:
        if not msg.reply:
            states = tuple(self.local_state())
            out.append(Outbound(src, (PushPull(False, True, self.name, states),), True))
        self._merge(msg.states, msg.source, now, out)

    def _merge(
        self, states: Iterable[PushNodeState], source: str, now: float, out: list[Outbound]
    ) -> None:
        for r in states:
            if len(r.meta) > self.config.max_meta_bytes:
                self.counters.drop("meta_too_large")
                continue
            if r.state == MemberState.ALIVE:
                self._on_alive(Alive(r.incarnation, r.name, r.addr, r.meta), now, out)
            elif r.state == MemberState.LEFT:
                self._on_dead(Dead(r.incarnation, r.name, r.name), now, out)
            else:
                # A remote "dead" only makes us suspect: we let our own timer decide. The sender
                # is the accuser: counting ourselves would turn one stale view into fake
                # independent confirmations that shrink other nodes' suspicion timers.
                self._on_suspect(Suspect(r.incarnation, r.name, source), now, out)

    def _join_packets(self) -> list[Outbound]:
        states = tuple(self.local_state())
        return [Outbound(s, (PushPull(True, False, self.name, states),), True) for s in self._seeds]

    def _join_retry_s(self) -> float:
        return 5 * self.config.probe_interval_s

    def _reap(self, now: float) -> None:
        window = self.config.gossip_to_the_dead_s
        for name in [
            n
            for n, m in self._members.items()
            if m.state in _DEAD_OR_LEFT and m is not self._local and now - m.state_change > window
        ]:
            m = self._members.pop(name)
            self._emit(EventKind.REAPED, m)
        # Failed members are retried for reconnects for a day, as Serf does.
        for name in [n for n, (_, t) in self._tombstones.items() if now - t > 86400]:
            del self._tombstones[name]

    # ------------------------------------------------------------------ helpers

    def _packet(self, addr: Address, msgs: list[Message]) -> Outbound:
        """Build a datagram of `msgs` plus as many queued broadcasts as fit."""
        used = PACKET_OVERHEAD + sum(message_size(m) for m in msgs)
        extra = self.broadcasts.take(self.config.packet_bytes - used, len(self._members))
        return Outbound(addr, tuple(msgs) + tuple(extra))

    def _queue(self, key: str, msg: Message) -> None:
        self.broadcasts.queue(key, msg, message_size(msg))

    def _queue_alive(self, m: _Member) -> None:
        self._queue(m.name, Alive(m.incarnation, m.name, m.addr, m.meta))

    def _emit(self, kind: EventKind, m: _Member) -> None:
        self._events.append(MemberEvent(kind, m.name, m.addr, m.incarnation, m.meta))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _insert_probe_target(self, name: str) -> None:
        # Insert at a random place so a new member is probed within one round.
        self._probe_order.append(name)
        i = int(self.rng.random() * len(self._probe_order))
        self._probe_order[i], self._probe_order[-1] = self._probe_order[-1], self._probe_order[i]

    def _random_members(self, k: int, accept: Any) -> list[_Member]:
        """Pick up to k distinct members satisfying `accept`, uniformly."""
        candidates = [m for m in self._members.values() if accept(m)]
        if len(candidates) <= k:
            return candidates
        # Partial Fisher-Yates: k swaps.
        for i in range(k):
            j = i + int(self.rng.random() * (len(candidates) - i))
            candidates[i], candidates[j] = candidates[j], candidates[i]
        return candidates[:k]


def _advance(scheduled: float, interval: float, now: float) -> float:
    """Return the next tick of a ticker; a ticker far behind skips missed ticks."""
    nxt = scheduled + interval
    return nxt if nxt > now else now + interval
