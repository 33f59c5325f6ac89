from __future__ import annotations

import msgpack
import pytest

from cluster.codec import (
    PACKET_OVERHEAD,
    decode_packet,
    encode_message,
    encode_packet,
    message_size,
)
from cluster.errors import (
    LocalUsageError,
    MalformedPacket,
    OversizedPacket,
    PeerProtocolError,
    Unauthenticated,
    UnsupportedVersion,
)
from cluster.keyring import Keyring, parse_keys
from cluster.messages import (
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    LeaseReply,
    LeaseRequest,
    MessageType,
    Nack,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
)

K1 = b"k" * 32
K2 = b"j" * 32
RING = Keyring((K1,))

EXAMPLES = [
    Ping(1, "b", "a"),
    IndirectPing(2, "c", ("10.0.0.3", 7946), True, "a"),
    Ack(3),
    Nack(4),
    Suspect(5, "c", "a"),
    Alive(6, "c", ("10.0.0.3", 7946), b"\x00meta"),
    Dead(7, "c", "a"),
    PushPull(True, False, "a", (PushNodeState("a", ("10.0.0.1", 7946), 3, 1, b"m"),)),
    LeaseRequest(8, "a", 9),
    LeaseReply(8, "v", "a", 9, True),
]


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_CLASSES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_each_message_round_trips_through_a_signed_packet(msg: object) -> None:
    packet = encode_packet([msg], RING, 1400)  # type: ignore[list-item]
    assert decode_packet(packet, RING, 1400) == [msg]


def test_message_type_numbers_are_the_wire_contract() -> None:
    # Append only: changing a number breaks every running node.
    assert [(t.name, int(t)) for t in MessageType] == [
        ("PING", 1),
        ("INDIRECT_PING", 2),
        ("ACK", 3),
        ("NACK", 4),
        ("SUSPECT", 5),
        ("ALIVE", 6),
        ("DEAD", 7),
        ("PUSH_PULL", 8),
        ("LEASE_REQUEST", 9),
        ("LEASE_REPLY", 10),
    ]


def test_a_compound_packet_filled_to_the_budget_stays_within_1400_bytes() -> None:
    msgs = [Alive(i, f"node-{i:04d}", ("10.0.0.1", 7946), b"x" * 40) for i in range(100)]
    budget = 1400 - PACKET_OVERHEAD
    chosen, used = [], 0
    for m in msgs:
        if used + message_size(m) <= budget:
            chosen.append(m)
            used += message_size(m)
    packet = encode_packet(chosen, RING, 1400)
    assert len(packet) <= 1400
    assert len(chosen) > 16  # the 3-byte array header case is covered
    assert decode_packet(packet, RING, 1400) == chosen


def test_a_key_from_the_ring_verifies_during_rotation() -> None:
    old = Keyring((K1,))
    rotating = Keyring((K2, K1))
    assert decode_packet(encode_packet([Ack(1)], old, 1400), rotating, 1400) == [Ack(1)]
    assert decode_packet(encode_packet([Ack(1)], rotating, 1400), Keyring((K1, K2)), 1400) == [
        Ack(1)
    ]


def test_a_packet_signed_with_an_unknown_key_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        decode_packet(encode_packet([Ack(1)], Keyring((K2,)), 1400), RING, 1400)


def test_an_unsigned_packet_is_refused_by_a_keyed_node() -> None:
    with pytest.raises(Unauthenticated):
        decode_packet(encode_packet([Ack(1)], Keyring(()), 1400), RING, 1400)


def test_a_flipped_bit_in_the_body_fails_authentication() -> None:
    packet = bytearray(encode_packet([Alive(1, "a", ("h", 1), b"m")], RING, 1400))
    packet[-1] ^= 1
    with pytest.raises(Unauthenticated):
        decode_packet(bytes(packet), RING, 1400)


def test_oversized_packets_are_refused_both_ways() -> None:
    with pytest.raises(OversizedPacket):
        decode_packet(b"\xc5" + b"\x00" * 1500, RING, 1400)
    with pytest.raises(LocalUsageError):
        encode_packet([Alive(1, "a", ("h", 1), b"x" * 1500)], RING, 1400)


def test_another_protocol_version_is_refused() -> None:
    packet = bytearray(encode_packet([Ack(1)], RING, 1400))
    packet[1] = PROTOCOL_VERSION + 1
    with pytest.raises(UnsupportedVersion):
        decode_packet(bytes(packet), RING, 1400)


def _signed(body: bytes) -> bytes:
    header = bytes([0xC5, PROTOCOL_VERSION, 1])
    return header + RING.sign(header + body) + body


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([]),
        msgpack.packb({"a": 1}),
        msgpack.packb([[99, 1]]),
        msgpack.packb([[3]]),
        msgpack.packb([[3, -1]]),
        msgpack.packb([[3, True]]),
        msgpack.packb([[1, 1, b"bytes-not-str", "a"]]),
        msgpack.packb([[6, 1, "a", ["h", 70000], b""]]),
        msgpack.packb([[8, True, False, "a", [["a", ["h", 1], 1, 9, b""]]]]),
        msgpack.packb([[3, 1]]) + b"trailing",
    ],
    ids=[
        "garbage",
        "empty",
        "map",
        "unknown-type",
        "missing-field",
        "negative",
        "bool-as-int",
        "wrong-type",
        "bad-port",
        "bad-state",
        "trailing-bytes",
    ],
)
def test_malformed_bodies_raise_malformed_packet(body: bytes) -> None:
    with pytest.raises(MalformedPacket):
        decode_packet(_signed(body), RING, 1400)


def test_truncated_or_foreign_packets_are_malformed() -> None:
    for data in (b"", b"\xc5", b"GET / HTTP/1.1\r\n"):
        with pytest.raises(MalformedPacket):
            decode_packet(data, RING, 1400)


def test_every_peer_error_carries_a_drop_reason() -> None:
    reasons = {
        cls.reason
        for cls in (MalformedPacket, OversizedPacket, Unauthenticated, UnsupportedVersion)
    }
    assert reasons == {"malformed", "oversized", "unauthenticated", "version"}
    assert all(issubclass(c, PeerProtocolError) for c in (MalformedPacket, Unauthenticated))


def test_encode_message_is_a_type_tagged_list() -> None:
    assert msgpack.unpackb(encode_message(Suspect(5, "c", "a"))) == [5, 5, "c", "a"]


def test_key_files_accept_hex_and_base64_and_reject_short_keys() -> None:
    ring = parse_keys("# primary\n" + "ab" * 16 + "\n\n" + "a2V5LWtleS1rZXkta2V5LWtleQ==\n")
    assert ring.keys == (bytes.fromhex("ab" * 16), b"key-key-key-key-key")
    with pytest.raises(ValueError, match="shorter"):
        parse_keys("abcd\n")
    with pytest.raises(ValueError, match="no key"):
        parse_keys("# nothing\n")


def test_a_value_the_wire_cannot_carry_is_a_local_usage_error() -> None:
    # msgpack's OverflowError would escape the runner, which handles LocalUsageError.
    too_big = Alive(2**64, "a", ("10.0.0.1", 7946), b"")
    with pytest.raises(LocalUsageError, match="cannot be encoded"):
        encode_packet([too_big], Keyring(()), 1400)
    with pytest.raises(LocalUsageError):
        message_size(too_big)
