"""A member's gossip stream port (TCP push-pull) under random, cut and mutated frames.

Each connection's fate is predicted with the member's own `read_frame` and `decode_packet`:
refused connections are never answered and counted by reason; a push-pull request is answered
with the member's whole state.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import Counter

import pytest

from cluster import codec
from cluster.config import local
from cluster.errors import PeerProtocolError
from cluster.keyring import TAG_BYTES
from cluster.messages import Address, Message, PushPull
from cluster.udp import frame, read_frame
from tests.integration.gossip_frames import EXACT_GOSSIP, capture, effects, signed_body
from tests.integration.live_cluster import (
    FUZZ,
    KEYRING,
    SEED,
    WAIT_S,
    WRONG,
    Cluster,
    assert_whole,
    by_label,
    mutate,
    scrape,
)
from tests.moc_node.cluster_procs import NAMES

pytestmark = pytest.mark.timeout(300)

STREAM_CONNECTIONS = 300
MAX_STREAM_BYTES = local().max_stream_bytes


def bad_stream(rng: random.Random, captured: list[bytes]) -> bytes:
    """Return what one connection sends: random, cut or mutated frames, or a valid request."""
    request = codec.encode_packet([PushPull(False, False, FUZZ, ())], KEYRING, MAX_STREAM_BYTES)
    base = frame(rng.choice([*captured, request]))
    kind = rng.choice(["random", "framed_random", "mutated", "mutated", "cut", "huge_length",
                       "unsigned", "wrong_key", "nothing", "replay"])  # fmt: skip
    packet = base[4:]
    body = packet[codec.HEADER_BYTES + TAG_BYTES :]
    if kind == "random":
        return rng.randbytes(rng.randint(1, 300))
    if kind == "framed_random":
        return frame(rng.randbytes(rng.randint(0, 300)))
    if kind == "mutated":
        return mutate(rng, base)
    if kind == "cut":
        return base[: rng.randrange(1, len(base))]
    if kind == "huge_length":
        return rng.randint(MAX_STREAM_BYTES + 1, 2**32 - 1).to_bytes(4, "big") + packet[:64]
    if kind == "unsigned":
        return frame(bytes([codec.MAGIC, 1, 0]) + body)
    if kind == "wrong_key":
        return frame(signed_body(body, WRONG))
    if kind == "nothing":
        return b""  # connect and hang up: not a frame, not counted
    return frame(request)  # answered with the member's state


def stream_verdict(data: bytes) -> str | list[Message]:
    """Return the drop reason the member counts for a connection sending `data`, or the
    messages it accepts (none for a connection that sends nothing)."""

    async def first_frame() -> bytes | None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, MAX_STREAM_BYTES)

    try:
        packet = asyncio.run(first_frame())
        return [] if packet is None else codec.decode_packet(packet, KEYRING, MAX_STREAM_BYTES)
    except PeerProtocolError as exc:
        return exc.reason


def frames_of(reply: bytes) -> list[Message]:
    """Decode every length-prefixed packet of a reply stream."""
    out: list[Message] = []
    while reply:
        n = int.from_bytes(reply[:4], "big")
        out += codec.decode_packet(reply[4 : 4 + n], KEYRING, MAX_STREAM_BYTES)
        reply = reply[4 + n :]
    return out


def exchange(addr: Address, data: bytes) -> bytes:
    """Send `data`, half-close, and read until the member closes (it has then counted it)."""
    with socket.create_connection(addr, timeout=WAIT_S) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_random_and_mutated_gossip_stream_frames_are_dropped_by_reason_and_requests_answered(
    cluster: Cluster,
) -> None:
    rng = random.Random(SEED + 3)
    target = cluster.members[NAMES[0]]
    captured = capture(cluster)
    before = {n: scrape(m.node) for n, m in cluster.members.items()}
    expected: Counter[str] = Counter()
    answered = requests = 0
    for _ in range(STREAM_CONNECTIONS):
        data = bad_stream(rng, captured)
        verdict = stream_verdict(data)
        reply = exchange(target.gossip, data)
        if isinstance(verdict, str):
            expected[verdict] += 1
            assert reply == b"", (data[:80], reply[:80])  # refused: never answered
            continue
        # Accepted: a push-pull request is answered with the member's state, a replayed push-pull
        # reply or ack is merged or dropped as stale, without an answer.
        expected.update(effects(verdict, target.name))
        wants_state = any(isinstance(m, PushPull) and not m.reply for m in verdict)
        got = frames_of(reply)
        if wants_state:
            requests += 1
            (state,) = got
            assert isinstance(state, PushPull) and state.source == target.name
            assert {s.name for s in state.states} == set(NAMES)
            answered += 1
        else:
            assert got == [], (verdict, got)
    after = {n: scrape(m.node) for n, m in cluster.members.items()}
    drops = by_label(after[target.name], "moc_gossip_messages_dropped_total") - by_label(
        before[target.name], "moc_gossip_messages_dropped_total"
    )
    print(f"gossip stream fuzz: {STREAM_CONNECTIONS} connections, {answered} push-pulls "
          f"answered, predicted drops {dict(expected)}, counted {dict(drops)}")  # fmt: skip
    assert {r: drops[r] for r in EXACT_GOSSIP} == {r: expected[r] for r in EXACT_GOSSIP}
    assert drops["stale"] >= expected["stale"]
    assert {"malformed", "unauthenticated", "oversized"} <= set(expected)
    assert answered == requests > 0
    assert_whole(cluster, before, after)
