"""A member's gossip port under a seeded stream of random and mutated datagrams.

A few thousand datagrams: random bytes, and mutations of real signed packets (acks and push-pull
replies captured from the members themselves, plus stale facts signed with the cluster key): bit
flips, truncations, extensions, re-signing with another key, unsigned, other versions, oversized,
and replays. Signed pings go in between all along and must be acked.

What each datagram must do is predicted on the client side with the receiver's own pure function
(`decode_packet`): the drop counters must move by exactly the number predicted bad, by reason.
Replays of validly signed packets are accepted by design (the gossip has no replay window, like
memberlist), so the stream replays only packets whose facts are stale or harmless: no suspicion,
no death, no unknown member may follow from it.
"""

from __future__ import annotations

import random
import socket
import time
from collections import Counter

import msgpack
import pytest

from cluster import codec
from cluster.config import local
from cluster.errors import PeerProtocolError
from cluster.keyring import TAG_BYTES
from cluster.messages import Ack, Alive, Dead, IndirectPing, Message, Nack, Ping, Suspect
from tests.integration.gossip_frames import (
    EXACT_GOSSIP,
    PACKET_BYTES,
    SEQ_BASE,
    capture,
    effects,
    signed,
    signed_body,
)
from tests.integration.live_cluster import (
    BATCH,
    FUZZ,
    KEYRING,
    SEED,
    WAIT_S,
    WRONG,
    Cluster,
    Member,
    assert_whole,
    by_label,
    mutate,
    scrape,
    until,
)
from tests.moc_node.cluster_procs import NAMES

pytestmark = pytest.mark.timeout(300)

GOSSIP_DATAGRAMS = 3000
BATCH_BYTES = 64 * 1024
"""Nor more bytes than this: the kernel drops datagrams beyond the receive buffer (~208 KiB)."""


def stale_facts(rng: random.Random, c: Cluster, target: str) -> list[Message]:
    """Return validly signed messages every member must drop (or just ack), by kind."""
    name = rng.choice([m.name for m in c.members.values()])
    addr = c.members[name].gossip
    seq = SEQ_BASE + rng.randrange(1 << 20)
    kind = rng.choice(["alive0", "suspect0", "dead0", "ack", "nack", "misdirected", "ping",
                       "meta", "indirect_bad_addr"])  # fmt: skip
    if kind == "alive0":
        return [Alive(0, name, addr, b"")]
    if kind == "suspect0":
        return [Suspect(0, name, FUZZ)]
    if kind == "dead0":
        return [Dead(0, name, FUZZ)]
    if kind == "ack":
        return [Ack(seq)]
    if kind == "nack":
        return [Nack(seq)]
    if kind == "misdirected":
        return [Ping(seq, name if name != target else "someone-else", FUZZ)]
    if kind == "ping":
        return [Ping(seq, target, FUZZ)]
    if kind == "meta":
        return [Alive(0, name, addr, rng.randbytes(local().max_meta_bytes + 1))]
    return [IndirectPing(seq, name, ("not-an-ip.invalid", 7946), False, FUZZ)]


def bad_datagram(rng: random.Random, c: Cluster, target: str, captured: list[bytes]) -> bytes:
    """Return one random, mutated, re-signed, oversized or replayed datagram."""
    base = rng.choice(captured) if rng.random() < 0.5 else signed(stale_facts(rng, c, target))
    kind = rng.choice(["random", "random_header", "mutated", "mutated", "mutated", "mutated",
                       "unsigned", "bad_tag", "wrong_key", "version", "oversized", "tiny",
                       "signed_garbage", "signed_wrong_shape", "replay", "replay"])  # fmt: skip
    header, body = base[: codec.HEADER_BYTES], base[codec.HEADER_BYTES + TAG_BYTES :]
    if kind == "random":
        return rng.randbytes(rng.randint(0, 1500))
    if kind == "random_header":
        return bytes([codec.MAGIC, 1, rng.randrange(4)]) + rng.randbytes(rng.randint(0, 200))
    if kind == "mutated":
        return mutate(rng, base)
    if kind == "unsigned":
        return bytes([codec.MAGIC, 1, 0]) + body
    if kind == "bad_tag":
        return header + rng.randbytes(TAG_BYTES) + body
    if kind == "wrong_key":
        return signed_body(body, WRONG)
    if kind == "version":
        return bytes([codec.MAGIC, rng.choice([0, 2, 3, 255])]) + base[2:]
    if kind == "oversized":
        return base + rng.randbytes(rng.randint(PACKET_BYTES + 1, 60000) - len(base))
    if kind == "tiny":
        return rng.choice([b"", bytes([codec.MAGIC]), bytes([codec.MAGIC, 1]), header])
    if kind == "signed_garbage":
        return signed_body(rng.randbytes(rng.randint(0, 300)))
    if kind == "signed_wrong_shape":
        shape = rng.choice(
            [[], {}, [[]], [[99, 1]], [[1, "x", "y"]], [[3, -1]], [[3, "seq"]], [[1, 1, "a", "b", 4]],
             [[6, 1, "n", ["127.0.0.1", 70000], b""]], [[6, 1, "n", "127.0.0.1", b""]],
             [[8, False, True, "s", [["n", ["h", 1], 1, 9, b""]]]], [[5, 2**63, "n"]], [1, 2],
             [[7, 1.5, "n", "a"]], [[10, 1, "v", "c", 1, "yes"]], "text", [[True, 1]]]
        )  # fmt: skip
        return signed_body(msgpack.packb(shape, use_bin_type=True))
    return base  # a replay of a stale or harmless packet


def classify(data: bytes) -> str | list[Message]:
    """Return the decode drop reason, or the decoded messages, as the member computes them."""
    try:
        return codec.decode_packet(data, KEYRING, PACKET_BYTES)
    except PeerProtocolError as exc:
        return exc.reason


class Pinger:
    """Send a signed ping and wait for its ack: the good request on the gossip port."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.seq = SEQ_BASE + (1 << 30)

    def ping(self, m: Member) -> None:
        self.seq += 1
        self.sock.sendto(signed([Ping(self.seq, m.name, FUZZ)]), m.gossip)
        deadline = time.monotonic() + WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            got = codec.decode_packet(self.sock.recvfrom(65536)[0], KEYRING, PACKET_BYTES)
            if any(isinstance(x, Ack) and x.seq == self.seq for x in got):
                return
        raise AssertionError(f"{m.name} did not ack ping {self.seq}")

    def close(self) -> None:
        self.sock.close()


def test_random_and_mutated_gossip_datagrams_are_dropped_by_reason_and_the_members_stay_healthy(
    cluster: Cluster,
) -> None:
    rng = random.Random(SEED)
    target = cluster.members[NAMES[2]]
    captured = capture(cluster)
    assert len(captured) >= 10, "the members sent too few harmless packets to mutate"
    before = {n: scrape(m.node) for n, m in cluster.members.items()}
    drops_before = by_label(before[target.name], "moc_gossip_messages_dropped_total")
    expected: Counter[str] = Counter()
    accepted = 0
    pinger = Pinger()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)  # replies to the replays are never read: the kernel drops them

    def caught_up() -> bool:
        # /cluster's drop counts are the metric's source, and cheaper to serve than /metrics.
        now = Counter(target.node.get("/cluster")["dropped"]) - drops_before
        over = {r: (now[r], expected[r]) for r in EXACT_GOSSIP if now[r] > expected[r]}
        assert not over, f"drops counted beyond the fuzz: {over}"
        return (
            all(now[r] == expected[r] for r in EXACT_GOSSIP) and now["stale"] >= expected["stale"]
        )

    try:
        in_flight = 0  # bytes sent since the counters last caught up
        for i in range(1, GOSSIP_DATAGRAMS + 1):
            data = bad_datagram(rng, cluster, target.name, captured)
            verdict = classify(data)
            if isinstance(verdict, str):
                expected[verdict] += 1
            else:
                accepted += 1
                expected.update(effects(verdict, target.name))
            sender.sendto(data, target.gossip)
            in_flight += len(data)
            if i % BATCH and i < GOSSIP_DATAGRAMS and in_flight < BATCH_BYTES:
                continue
            until(caught_up, f"drop counters after {i} datagrams")
            in_flight = 0
            if i % BATCH == 0:
                pinger.ping(target)  # the good request: a signed ping is still acked
    finally:
        pinger.close()
        sender.close()

    after = {n: scrape(m.node) for n, m in cluster.members.items()}
    drops = by_label(after[target.name], "moc_gossip_messages_dropped_total") - drops_before
    print(f"gossip fuzz: {GOSSIP_DATAGRAMS} datagrams, {accepted} accepted (replays, stale facts), "
          f"predicted drops {dict(expected)}, counted {dict(drops)}")  # fmt: skip
    assert {r: drops[r] for r in EXACT_GOSSIP} == {r: expected[r] for r in EXACT_GOSSIP}
    assert sum(expected[r] for r in ("malformed", "unauthenticated")) > GOSSIP_DATAGRAMS // 2
    assert min(expected[r] for r in EXACT_GOSSIP) > 0, "every drop reason was exercised"
    assert 0 < accepted < GOSSIP_DATAGRAMS // 2
    assert_whole(cluster, before, after)
    assert FUZZ not in {m["name"] for m in target.node.get("/cluster")["members"]}
