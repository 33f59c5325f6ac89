"""Drive the membership and election machines over real sockets (asyncio).

The runner decides nothing about the protocol: it decodes what arrives, hands each message to
`Election` (lease messages) or `Membership` (everything else), sends the `Outbound`s they return
(datagrams, or one TCP exchange when `reliable`; a reliable message's replies go back on its
stream), and calls `tick` when `next_deadline` comes. Garbage from peers is counted by reason and
dropped. Around that it polls the node's metadata, publishes it when `should_publish` says so,
and keeps the placement `Fence` at the highest term seen.

Use:

    runner = ClusterRunner(config, "gpu-a", keyring, term_store, node_meta)
    await runner.start()            # binds, joins config.seeds
    runner.members(); runner.primary(); runner.is_primary(); runner.fence.admit(term)
    await runner.leave(timeout=2.0) # graceful: peers record "left", not "failed"
    await runner.stop()
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.registry import CollectorRegistry
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from cluster import metrics
from cluster.codec import decode_packet, encode_packet
from cluster.config import ClusterConfig, parse_hostport
from cluster.election import Election, Fence, TermStore
from cluster.errors import LocalUsageError, PeerProtocolError
from cluster.keyring import Keyring
from cluster.membership import EventKind, Membership, Outbound
from cluster.messages import Address, Message
from cluster.meta import BadMeta, NodeMeta, decode_meta, encode_meta, should_publish
from cluster.routing import ClusterMember, claimed_primary
from cluster.udp import (
    FRAME_HEADER_BYTES,
    Endpoints,
    frame,
    open_endpoints,
    peer_address,
    read_frame,
    stream_exchange,
)

__all__ = [
    "MAX_INBOUND_STREAMS",
    "Clock",
    "ClusterEvent",
    "ClusterRunner",
    "EventHook",
    "MetaProvider",
    "Resolver",
    "SEED_RESOLVE_MAX_S",
]

log = logging.getLogger(__name__)

MetaProvider = Callable[[], NodeMeta]
Clock = Callable[[], float]
Resolver = Callable[[str, int], Awaitable[Address]]
"""Resolve a seed's host name and port to the address to send to; OSError when it does not."""

SEED_RESOLVE_MAX_S = 30.0
"""Longest pause between two tries to resolve a seed name that does not resolve yet (a peer
whose container or DNS record comes up later): one query per half minute costs nothing."""


async def resolve_udp(host: str, port: int) -> Address:
    """Resolve `host` with the system resolver, as a gossip (UDP) peer is reached."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=2)  # SOCK_DGRAM
    return str(infos[0][4][0]), port

MAX_INBOUND_STREAMS = 64
"""Concurrent inbound TCP exchanges; more are refused (counted as "stream_busy")."""


@dataclass(frozen=True, slots=True)
class ClusterEvent:
    """A member change, with the member's metadata decoded (None if absent or garbage)."""

    kind: EventKind
    name: str
    addr: Address
    incarnation: int
    meta: NodeMeta | None


EventHook = Callable[[ClusterEvent], None]


@dataclass(slots=True)
class _Traffic:
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    stream_failures: int = 0


class ClusterRunner:
    """One node's membership and election on a UDP socket plus a TCP listener on the same port."""

    def __init__(
        self,
        config: ClusterConfig,
        name: str,
        keyring: Keyring,
        term_store: TermStore,
        meta_provider: MetaProvider | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        on_event: EventHook | None = None,
        registry: CollectorRegistry | None = None,
        meta_poll_s: float = 0.1,
        resolve: Resolver = resolve_udp,
    ) -> None:
        """Prepare a runner; nothing is bound until `start`.

        `config.bind` may use port 0 (tests): both sockets then share a free port. `registry`,
        when given, receives the `moc_cluster_*` / `moc_gossip_*` collector at start.
        `resolve` turns seed names into addresses (tests hand in a resolver of their own).
        """
        if not name:
            raise LocalUsageError("a cluster node needs a name")
        self.config = config
        self.name = name
        self.keyring = keyring
        self.term_store = term_store
        self.meta_provider = meta_provider or NodeMeta
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_event = on_event
        self.registry = registry
        self.meta_poll_s = meta_poll_s
        self.resolve = resolve
        self._seeds: list[Address] = []
        """The seeds' addresses joined through, those resolved late included."""
        self._resolving: set[str] = set()
        """Seed names that did not resolve yet and are being retried."""
        self.fence = Fence(term_store)
        """Admit or refuse placement commands by term; kept at the highest term seen."""
        self.traffic = _Traffic()
        self._dropped: dict[str, int] = {}
        self._endpoints: Endpoints | None = None
        self._membership: Membership | None = None
        self._election: Election | None = None
        self._collector: metrics.ClusterCollector | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbound = 0
        self._published: NodeMeta | None = None
        self._published_at: float | None = None
        self._next_meta_poll = 0.0
        self._meta_cache: dict[bytes, NodeMeta | None] = {}
        self._leaving = False
        self._left = asyncio.Event()
        self._members_view: dict[str, ClusterMember] | None = None
        self._stopped = False
        self._stream_timeout = config.stream_timeout_s

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind both sockets, start the machines and join `config.seeds`."""
        host, port = _split_bind(self.config.bind)
        self._endpoints = await open_endpoints(host, port, self._on_datagram, self._on_stream)
        addr = await self._advertise(self._endpoints.addr)
        now = self.clock()
        meta = self._poll_meta(now)
        self._changing()
        self._membership = Membership(
            self.config, self.name, addr, self.rng, now, encode_meta(meta)
        )
        self._published, self._published_at = meta, now
        self._election = Election(
            self.config, self.name, self.term_store, self._membership, self.rng, now
        )
        if self.registry is not None:
            self._collector = metrics.register(self.stats, self.registry)
        log.info("cluster node %s listening on %s:%d", self.name, *addr)
        if self.config.seeds:
            await self.join(self.config.seeds)
        self._schedule()

    async def join(self, seeds: Sequence[str]) -> None:
        """Join (or re-join) through `host:port` seeds.

        A name is resolved once; one that does not resolve yet (its host is not up, or not in
        DNS yet) is retried in the background with backoff and joined through once it does.
        The join itself is retried by the membership machine's own timer, not here.
        """
        resolved: list[Address] = []
        for seed in seeds:
            host, port = parse_hostport(seed, "seeds")
            if _is_ip(host):
                resolved.append((host, port))
                continue
            try:
                resolved.append(await self.resolve(host, port))
            except OSError as exc:
                log.warning("cluster seed %s does not resolve yet (%s): retrying", seed, exc)
                if seed not in self._resolving:
                    self._resolving.add(seed)
                    self._spawn(self._resolve_later(seed, host, port))
        self._seeds = resolved
        self._join()

    def _join(self) -> None:
        if self._stopped or self._leaving:
            return
        self._changing()
        self._send(self._m.join(tuple(self._seeds), self.clock()))
        self._after_step()

    async def _resolve_later(self, seed: str, host: str, port: int) -> None:
        """Resolve `seed` until it resolves (or the runner stops), then join through it too."""
        # No stop: a seed may come up hours later; the pause grows from one probe interval to
        # SEED_RESOLVE_MAX_S, with jitter so that nodes started together do not ask in step.
        first = self.config.probe_interval_s
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=first, max=SEED_RESOLVE_MAX_S, jitter=first),
            retry=retry_if_exception_type(OSError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    address = await self.resolve(host, port)
        finally:
            self._resolving.discard(seed)
        log.info("cluster seed %s resolves to %s:%d now: joining through it", seed, *address)
        self._seeds.append(address)
        self._join()

    async def leave(self, timeout: float) -> bool:
        """Announce a graceful leave and wait until it has been gossiped or `timeout` passes.

        Return whether the leave broadcast was used up in time. The node stops acting as
        primary at once (its lease runs out on its own) and no longer probes anyone.
        """
        if self._membership is None or self._stopped:
            return False
        if not self._leaving:
            self._leaving = True
            self._changing()
            self._send(self._m.leave(self.clock()))
            self._after_step()
        try:
            await asyncio.wait_for(self._left.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Close the sockets and cancel pending exchanges (no goodbye: use `leave` first)."""
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._endpoints is not None:
            await self._endpoints.close()
        if self._collector is not None and self.registry is not None:
            self.registry.unregister(self._collector)
            self._collector = None

    # ------------------------------------------------------------------ queries

    @property
    def addr(self) -> Address:
        """Return the (host, port) peers reach this node at."""
        return self._m.addr

    @property
    def membership(self) -> Membership:
        """Return the membership machine (read-only use: counters, raw views)."""
        return self._m

    @property
    def election(self) -> Election:
        """Return the election machine (read-only use: counters, lease windows)."""
        assert self._election is not None, "start() first"
        return self._election

    def members(self) -> list[ClusterMember]:
        """Return every known member (this node included) with its decoded metadata."""
        return list(self._view().values())

    def member(self, name: str) -> ClusterMember | None:
        """Return one member, or None if unknown (or reaped)."""
        return self._view().get(name)

    def _view(self) -> dict[str, ClusterMember]:
        """The members by name, built once per step of the state machine.

        Forwarding reads the view on every request, far more often than the membership moves;
        every step that can move it (a packet, a stream, a tick, join, leave) drops this copy
        first (`_changing`), so a read never sees a view older than the machine's.
        """
        if self._members_view is None:
            self._members_view = {
                v.name: ClusterMember(v.name, v.addr, v.state, v.incarnation, self._decode(v.meta))
                for v in self._m.members()
            }
        return self._members_view

    def _changing(self) -> None:
        """Forget the cached view: the state machine is about to take a step."""
        self._members_view = None

    def is_primary(self) -> bool:
        """Return whether this node may act as primary now (lease held, margin kept)."""
        if self._election is None or self._leaving or self._stopped:
            return False
        return self._election.is_primary(self.clock())

    @property
    def term(self) -> int:
        """Return the highest term this node has seen (votes, leases, fenced commands)."""
        e = self._election.highest_term if self._election is not None else 0
        return max(e, self.fence.highest)

    def primary(self) -> tuple[str, int] | None:
        """Return (name, term) of the acting primary as far as this node knows, or None.

        This node's own lease is exact; another node's claim comes from its gossiped metadata
        (alive members only; the highest term wins), so it can lag by a gossip round: a
        primary that lost its lease publishes term 0 within `MIN_PUBLISH_INTERVAL_S`. A
        placement command still carries its term through the `Fence`.
        """
        if self.is_primary():
            return self.name, self.election.term
        return claimed_primary(self._view().values(), self.name)

    def dropped(self) -> dict[str, int]:
        """Return dropped messages by reason: decoding here plus the machines' own drops."""
        out = dict(self._dropped)
        for reason, n in self._m.counters.dropped.items():
            out[reason] = out.get(reason, 0) + n
        return out

    def stats(self) -> metrics.ClusterStats:
        """Return the snapshot the metrics report."""
        by_state: dict[str, int] = {}
        for v in self._m.members():
            key = v.state.name.lower()
            by_state[key] = by_state.get(key, 0) + 1
        c = self._m.counters
        t = self.traffic
        return metrics.ClusterStats(
            members=by_state,
            primary=self.is_primary(),
            term=self.term,
            elections=self.election.counters.elections_started,
            suspicions=c.suspicions,
            refutes=c.refutes,
            bytes_in=t.bytes_in,
            bytes_out=t.bytes_out,
            packets_in=t.packets_in,
            packets_out=t.packets_out,
            dropped=self.dropped(),
        )

    # ------------------------------------------------------------------ receiving

    def _on_datagram(self, data: bytes, src: Address) -> None:
        if self._stopped or self._membership is None:
            return
        self.traffic.packets_in += 1
        self.traffic.bytes_in += len(data)
        try:
            msgs = decode_packet(data, self.keyring, self.config.packet_bytes)
        except PeerProtocolError as exc:
            self._drop(exc.reason)
            return
        self._send(self._dispatch(msgs, src, reliable=False))
        self._after_step()

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopped or self._membership is None or self._inbound >= MAX_INBOUND_STREAMS:
            self._drop("stream_busy")
            writer.close()
            return
        self._inbound += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        src = peer_address(writer)
        try:
            async with asyncio.timeout(self._stream_timeout):
                data = await read_frame(reader, self.config.max_stream_bytes)
                if data is None:
                    return
                self.traffic.packets_in += 1
                self.traffic.bytes_in += FRAME_HEADER_BYTES + len(data)
                msgs = decode_packet(data, self.keyring, self.config.max_stream_bytes)
                out = self._dispatch(msgs, src, reliable=True)
                back = [ob for ob in out if ob.reliable and ob.addr == src]
                self._send([ob for ob in out if not (ob.reliable and ob.addr == src)])
                for ob in back:
                    packet = self._encode(ob, self.config.max_stream_bytes)
                    if packet is not None:
                        writer.write(frame(packet))
                        self.traffic.packets_out += 1
                        self.traffic.bytes_out += FRAME_HEADER_BYTES + len(packet)
                await writer.drain()
                self._after_step()
        except PeerProtocolError as exc:
            self._drop(exc.reason)
        except (OSError, TimeoutError):
            self.traffic.stream_failures += 1
        finally:
            self._inbound -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def _dispatch(self, msgs: Sequence[Message], src: Address, reliable: bool) -> list[Outbound]:
        self._changing()
        now = self.clock()
        out: list[Outbound] = []
        e = self.election
        for msg in msgs:
            try:
                if e.accepts(msg):
                    out.extend(e.handle(msg, src, now))
                else:
                    out.extend(self._m.handle(msg, src, now, reliable))
            except Exception:
                # A message a machine cannot handle must not escape into the loop's callbacks
                # (nor drop the rest of the packet): count it and log the bug.
                log.exception("cluster: handling %s from %s:%d failed", type(msg).__name__, *src)
                self._drop("handler_error")
        return out

    # ------------------------------------------------------------------ sending

    def _send(self, out: Sequence[Outbound]) -> None:
        if self._stopped or self._endpoints is None:
            return
        for ob in out:
            if ob.reliable:
                self._spawn(self._stream_request(ob))
                continue
            if not _is_ip(ob.addr[0]):
                # A name would make sendto resolve it, blocking the loop: addresses on the
                # wire are IPs (advertise is resolved at start), so this is a peer's garbage.
                self._drop("bad_address")
                continue
            packet = self._encode(ob, self.config.packet_bytes)
            if packet is None:
                continue
            self._endpoints.sendto(packet, ob.addr)
            self.traffic.packets_out += 1
            self.traffic.bytes_out += len(packet)

    def _encode(self, ob: Outbound, limit: int) -> bytes | None:
        try:
            return encode_packet(ob.messages, self.keyring, limit)
        except LocalUsageError:
            # The machines size their packets; reaching this is a bug worth a log line.
            log.exception("cluster: cannot encode a packet for %s", ob.addr)
            self._drop("unsendable")
            return None

    async def _stream_request(self, ob: Outbound) -> None:
        packet = self._encode(ob, self.config.max_stream_bytes)
        if packet is None:
            return
        self.traffic.packets_out += 1
        self.traffic.bytes_out += FRAME_HEADER_BYTES + len(packet)

        def on_reply(data: bytes) -> None:
            self.traffic.packets_in += 1
            try:
                msgs = decode_packet(data, self.keyring, self.config.max_stream_bytes)
            except PeerProtocolError as exc:
                self._drop(exc.reason)
                return
            self._send(self._dispatch(msgs, ob.addr, reliable=True))
            self._after_step()

        try:
            got = await stream_exchange(
                ob.addr, packet, self.config.max_stream_bytes, self._stream_timeout, on_reply
            )
            self.traffic.bytes_in += got
        except PeerProtocolError as exc:
            self._drop(exc.reason)
        except (OSError, TimeoutError):
            # A dead or partitioned peer: the protocol's own timers handle it.
            self.traffic.stream_failures += 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ timers

    def _schedule(self) -> None:
        if self._stopped or self._membership is None:
            return
        at = min(self._m.next_deadline(), self._next_meta_poll)
        if not self._leaving:
            at = min(at, self.election.next_deadline())
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        delay = max(0.0, at - self.clock())
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._stopped:
            return
        self._changing()  # the tick, and the metadata it may publish
        try:
            now = self.clock()
            out = self._m.tick(now)
            if not self._leaving:
                out.extend(self.election.tick(now))
            if now >= self._next_meta_poll:
                self._next_meta_poll = now + self.meta_poll_s
                self._maybe_publish(now)
            self._send(out)
        except Exception:
            # A bug in a machine must not stop the node's gossip for good: log, keep ticking.
            log.exception("cluster: tick failed")
        self._after_step()

    def _after_step(self) -> None:
        """Deliver events, keep the fence current, notice a finished leave, re-arm the timer."""
        m = self._m
        for ev in m.events():
            if self.on_event is None:
                continue
            event = ClusterEvent(ev.kind, ev.name, ev.addr, ev.incarnation, self._decode(ev.meta))
            try:
                self.on_event(event)
            except Exception:
                log.exception("cluster: event hook failed")
        if self._election is not None and self._election.highest_term > self.fence.highest:
            self.fence.admit(self._election.highest_term)
        if self._leaving and m.leave_broadcast_done():
            self._left.set()
        self._schedule()

    # ------------------------------------------------------------------ metadata

    def _poll_meta(self, now: float) -> NodeMeta:
        meta = self.meta_provider()
        term = self.election.term if self.is_primary() else 0
        return dataclasses.replace(meta, primary_term=term)

    def _maybe_publish(self, now: float) -> None:
        if self._leaving:
            return  # a new Alive after our leave would bring us back in everyone's view
        try:
            meta = self._poll_meta(now)
        except Exception:
            log.exception("cluster: metadata provider failed")
            return
        if should_publish(self._published, meta, self._published_at, now):
            try:
                self._m.set_meta(encode_meta(meta, self.config.max_meta_bytes), now)
            except LocalUsageError:
                # Our own record no longer encodes: log it, but keep this tick's probes and acks.
                log.exception("cluster: cannot publish metadata")
                return
            self._published, self._published_at = meta, now

    def _decode(self, data: bytes) -> NodeMeta | None:
        if not data:
            return None
        if data in self._meta_cache:
            return self._meta_cache[data]
        try:
            meta: NodeMeta | None = decode_meta(data)
        except BadMeta:
            meta = None
            self._drop(BadMeta.reason)
        if len(self._meta_cache) > 4096:
            self._meta_cache.clear()
        self._meta_cache[data] = meta
        return meta

    # ------------------------------------------------------------------ helpers

    @property
    def _m(self) -> Membership:
        assert self._membership is not None, "start() first"
        return self._membership

    def _drop(self, reason: str) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1

    async def _advertise(self, bound: Address) -> Address:
        if self.config.advertise:
            host, port = parse_hostport(self.config.advertise, "advertise")
            if not _is_ip(host):
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=2)
                host = str(infos[0][4][0])
            return host, port
        if bound[0] in ("0.0.0.0", "::"):
            raise LocalUsageError("cluster.advertise: required when bind is a wildcard address")
        return bound


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _split_bind(bind: str) -> tuple[str, int]:
    """Split `config.bind`, allowing port 0 (pick a free port) unlike seeds and advertise."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise LocalUsageError(f"cluster.bind: {bind!r} is not host:port")
    return host.strip("[]"), int(port)
