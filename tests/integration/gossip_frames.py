"""Signed gossip packets as a member would send them, and the drops a member counts for them."""

from __future__ import annotations

import socket
from collections import Counter

from cluster import codec
from cluster.config import local
from cluster.keyring import Keyring
from cluster.messages import Ack, Alive, Dead, IndirectPing, Message, Nack, Ping, PushPull, Suspect
from cluster.udp import frame
from tests.integration.live_cluster import FUZZ, KEYRING, Cluster

PACKET_BYTES = local().packet_bytes
SEQ_BASE = 1 << 40
"""Sequence numbers of the test's pings: far above the members' own counters."""
EXACT_GOSSIP = ("malformed", "unauthenticated", "oversized", "version", "meta_too_large",
                "misdirected", "bad_address")  # fmt: skip
"""Drop reasons the members' own traffic never produces: they must move by exactly the fuzz."""


def signed(messages: list[Message]) -> bytes:
    return codec.encode_packet(messages, KEYRING, PACKET_BYTES)


def signed_body(body: bytes, keyring: Keyring = KEYRING) -> bytes:
    """Frame and sign an arbitrary body, as a member with the cluster key would."""
    header = bytes([codec.MAGIC, 1, codec.FLAG_HMAC])
    return header + keyring.sign(header + body) + body


def harmless(messages: list[Message]) -> bool:
    """Tell whether replaying these messages later can only be stale or a no-op."""
    for m in messages:
        if isinstance(m, Suspect | Dead):
            return False
        if isinstance(m, PushPull) and any(s.state != 0 for s in m.states):
            return False
    return True


def capture(c: Cluster) -> list[bytes]:
    """Return real signed packets the members send: ping acks and push-pull replies."""
    packets: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5.0)
        for i, m in enumerate(c.members.values()):
            for j in range(4):
                s.sendto(signed([Ping(SEQ_BASE + 10 * i + j, m.name, FUZZ)]), m.gossip)
                packets.append(s.recvfrom(65536)[0])
    for m in c.members.values():
        with socket.create_connection(m.gossip, timeout=5.0) as t:
            request = codec.encode_packet([PushPull(False, False, FUZZ, ())], KEYRING, 1 << 20)
            t.sendall(frame(request))
            reply = b""
            while chunk := t.recv(65536):
                reply += chunk
        packets.append(reply[4:])
    return [p for p in packets if harmless(codec.decode_packet(p, KEYRING, 1 << 20))]


def effects(messages: list[Message], target: str) -> Counter[str]:
    """Predict the drops a member counts for a decoded packet ("stale" is a lower bound)."""
    out: Counter[str] = Counter()
    for m in messages:
        if isinstance(m, Ack | Nack) and m.seq >= SEQ_BASE:
            out["stale"] += 1
        elif isinstance(m, Alive) and len(m.meta) > local().max_meta_bytes:
            out["meta_too_large"] += 1
        elif isinstance(m, Alive | Suspect | Dead) and m.incarnation == 0 and m.node != target:
            out["stale"] += 1
        elif isinstance(m, Suspect | Dead) and m.incarnation == 0:
            out["stale"] += 1  # about the target itself: stale too, never refuted
        elif isinstance(m, Ping) and m.target != target:
            out["misdirected"] += 1
        elif isinstance(m, IndirectPing) and not m.target_addr[0][0].isdigit():
            out["bad_address"] += 1
    return out
