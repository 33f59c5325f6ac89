"""Property tests of the three wire codecs: legacy ZeroMQ frames, the worker protocol, gossip.

Each codec must round-trip every message it can encode, and turn any bytes a peer may send into
either a message or its own documented error (`BadFrame`, `ProtocolError`, a `PeerProtocolError`
subclass), never another exception. Message strategies are derived from the dataclass field
annotations, so a message type added later is fuzzed without touching this file (a new field type
fails loudly until a strategy is added for it).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from actors.types import Backend, ChatMessage, DeviceKind, TensorData
from actors.worker import protocol as wp
from cluster import codec
from cluster.errors import (
    MalformedPacket,
    OversizedPacket,
    PeerProtocolError,
    Unauthenticated,
    UnsupportedVersion,
)
from cluster.keyring import Keyring
from cluster.messages import MESSAGE_CLASSES, PROTOCOL_VERSION, PushNodeState
from transports import zmq_codec as zc
from transports.dispatch import ACTIONS
from transports.errors import BadFrame, classify

SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

U64 = st.integers(min_value=0, max_value=2**64 - 1)
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
WIRE_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry

# ---- mutations of valid frames ----


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """Return `valid` truncated, with bytes flipped, inserted or deleted, or spliced with noise."""
    data = bytearray(valid)
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "splice"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, max(0, len(data) - 1)))])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at:] = draw(st.binary(max_size=16))
    return bytes(data)


# ---- the legacy ZeroMQ frames ----

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        WIRE_INTS,
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.binary(max_size=4)), inner, max_size=3),
    ),
    max_leaves=10,
)
ACTION_NAMES = sorted([*ACTIONS, "", "shutdown", "__class__"])


def legacy_requests(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Request objects: the legacy keys with plausible or arbitrary values, plus stray keys."""
    names = st.sampled_from(ACTION_NAMES)
    return st.fixed_dictionaries(
        {"action": st.one_of(names, names, names, values)},
        optional={
            "payload": st.one_of(
                st.fixed_dictionaries(
                    {"model_name": st.sampled_from(["tiny", ""]), "input_text": st.text()}
                ),
                values,
            ),
            "request_id": values,
            "timestamp": st.text(max_size=25),
        },
    )


def json_frame(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def msgpack_frame(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


valid_frames = st.one_of(
    legacy_requests(json_values).map(json_frame),
    legacy_requests(msgpack_values).map(msgpack_frame),
)
zmq_bodies = st.one_of(
    st.binary(max_size=64),
    valid_frames,
    valid_frames,
    valid_frames.flatmap(mutated),
    json_values.map(json_frame),
    msgpack_values.map(msgpack_frame),
)
LABELS = {*ACTIONS, zc.NO_ACTION, zc.UNKNOWN_ACTION}


def answer_frame(body: bytes) -> tuple[bytes, str, str, bool]:
    """Run one body frame through the server's pure steps as `ZmqServer._on_message` does.

    Return the encoded reply (for refusals; b"" for a request that would run), its encoding, the
    metric label and whether the request reached the action table.
    """
    try:
        encoding, obj = zc.decode_frame(body)
    except BadFrame as exc:
        encoding = zc.guess_encoding(body)
        err = classify(exc)
        return zc.encode_reply(zc.error_reply(err, None, 1.0), encoding), encoding, "none", False
    label = zc.action_label(obj)
    request_id, parsed = zc.parse_request(obj, encoding)
    if isinstance(parsed, BaseException):
        err = classify(parsed)
        # A refusal of the client's frame is the client's fault (or a feature not there yet),
        # never an internal error.
        assert err.code != "internal_error", parsed
        assert 400 <= err.status < 500 or err.code == "not_available"
        reply = zc.encode_reply(zc.error_reply(err, request_id, 1.0), encoding)
        return reply, encoding, label, False
    assert parsed.action.name in ACTIONS
    assert isinstance(parsed.payload, dict)
    # A success reply echoes the id: it must be encodable in the request's encoding.
    zc.encode_reply(zc.success_reply({"ok": True}, request_id, 1.0), encoding)
    return b"", encoding, label, True


def decode_reply(data: bytes, encoding: str) -> Any:
    return json.loads(data) if encoding == "json" else msgpack.unpackb(data, raw=False)


@SETTINGS
@given(zmq_bodies)
def test_any_zmq_frame_is_answered_in_its_encoding_or_reaches_the_table(body: bytes) -> None:
    reply, encoding, label, dispatched = answer_frame(body)
    event(f"{label}: {'dispatched' if dispatched else 'refused'}")
    assert encoding in ("json", "msgpack")
    assert label in LABELS
    if not dispatched:
        decoded = decode_reply(reply, encoding)
        assert decoded["success"] is False
        assert decoded["error"] and decoded["error_code"]


@SETTINGS
@given(st.lists(st.binary(max_size=12), max_size=6))
def test_any_multipart_message_splits_into_an_envelope_and_a_body(frames: list[bytes]) -> None:
    envelope, body = zc.split_envelope(frames)
    assert envelope + body == frames
    assert len(envelope) <= max(1, len(frames))


# ---- the worker protocol ----


@st.composite
def tensors(draw: st.DrawFn) -> TensorData:
    dtype = draw(st.sampled_from(sorted(wp.DTYPE_SIZES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    count = 1
    for d in shape:
        count *= d
    data = draw(
        st.binary(min_size=count * wp.DTYPE_SIZES[dtype], max_size=count * wp.DTYPE_SIZES[dtype])
    )
    return TensorData(dtype, shape, data)


TOKEN_IDS = st.lists(st.integers(0, 2**31 - 1), max_size=4).map(tuple)

WORKER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "int": WIRE_INTS,
    "float": st.floats(allow_nan=False),  # NaN never equals itself, so round trips cannot show it
    "str": st.text(max_size=20),
    "bool": st.booleans(),
    "int | None": st.none() | WIRE_INTS,
    "str | None": st.none() | st.text(max_size=20),
    "tuple[str, ...]": st.lists(st.text(max_size=5), max_size=3).map(tuple),
    "tuple[ChatMessage, ...] | None": st.none()
    | st.lists(st.builds(ChatMessage, st.text(max_size=8), st.text(max_size=20)), max_size=3).map(
        tuple
    ),
    "tuple[TensorData, ...] | None": st.none() | st.lists(tensors(), max_size=2).map(tuple),
    "Backend": st.sampled_from(typing.get_args(Backend)),
    "DeviceKind": st.sampled_from(typing.get_args(DeviceKind)),
    "float | None": st.none() | st.floats(allow_nan=False),
    "str | tuple[int, ...] | None": st.none() | st.text(max_size=20) | TOKEN_IDS,
    "tuple[str | tuple[int, ...], ...]": st.lists(st.text(max_size=8) | TOKEN_IDS, max_size=3).map(
        tuple
    ),
    "tuple[bytes, ...]": st.lists(st.binary(max_size=16), max_size=3).map(tuple),
    "tuple[tuple[int, float], ...]": st.lists(
        st.tuples(WIRE_INTS, st.floats(allow_nan=False)), max_size=3
    ).map(tuple),
    "tuple[TokenLogprob, ...] | None": st.none()
    | st.lists(
        st.tuples(
            st.binary(max_size=4),
            st.floats(allow_nan=False),
            st.lists(st.tuples(st.binary(max_size=4), st.floats(allow_nan=False)), max_size=2).map(
                tuple
            ),
        ),
        max_size=3,
    ).map(tuple),
}


def worker_message(cls: type[Any]) -> st.SearchStrategy[Any]:
    return st.builds(cls, *(WORKER_FIELDS[str(f.type)] for f in dataclasses.fields(cls)))


worker_messages = st.one_of(*(worker_message(cls) for cls in wp._BY_TYPE.values()))
# Arrays that look like frames: a plausible type number and fields of any wire type, including
# extension values whose payloads are garbage.
ext_values = st.one_of(
    st.builds(
        msgpack.ExtType,
        st.sampled_from([0, 1, 2, 3, 127]),
        st.one_of(
            st.binary(max_size=16),
            st.lists(msgpack_values, max_size=4).map(msgpack_frame),
        ),
    ),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34), st.integers(0, 999_999_999)),
)


@st.composite
def one_field_replaced(draw: st.DrawFn, wire: list[Any]) -> list[Any]:
    """Return a message's wire array with one field (never the type number) replaced."""
    if len(wire) > 1:
        at = draw(st.integers(1, len(wire) - 1))
        wire = [*wire[:at], draw(st.one_of(msgpack_values, ext_values)), *wire[at + 1 :]]
    return wire


def worker_frame(wire: list[Any]) -> bytes:
    """Pack a worker wire array as `encode` does (chat messages and tensors as extensions)."""
    return bytes(msgpack.packb(wire, use_bin_type=True, default=wp._default))


frame_like = st.tuples(
    st.one_of(st.integers(-1, 12), msgpack_values),
    st.lists(st.one_of(msgpack_values, ext_values), max_size=11),
).map(lambda t: msgpack_frame([t[0], *t[1]]))


@SETTINGS
@given(worker_messages)
def test_every_worker_message_round_trips(msg: wp.Message) -> None:
    assert wp.decode(wp.encode(msg)) == msg


@SETTINGS
@given(worker_messages.flatmap(lambda m: st.tuples(st.just(wp.encode(m)), st.data())))
def test_a_truncated_worker_frame_is_refused(case: tuple[bytes, st.DataObject]) -> None:
    frame, data = case
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(wp.ProtocolError):
        wp.decode(frame[:cut])


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=64),
        frame_like,
        worker_messages.map(wp.encode).flatmap(mutated),
        worker_messages.map(lambda m: [wp._BY_CLASS[type(m)], *wp.astuple_shallow(m)])
        .flatmap(one_field_replaced)
        .map(worker_frame),
    )
)
def test_any_bytes_decode_to_a_worker_message_or_a_protocol_error(frame: bytes) -> None:
    try:
        msg = wp.decode(frame)
    except wp.ProtocolError:
        event("refused")
        return
    event("decoded")
    assert type(msg) in wp._BY_TYPE.values()


# ---- the gossip codec ----

addresses = st.tuples(st.text(max_size=15), st.integers(0, 65535))
CLUSTER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "int": U64,
    "str": st.text(max_size=16),
    "bool": st.booleans(),
    "bytes": st.binary(max_size=32),
    "Address": addresses,
    "tuple[PushNodeState, ...]": st.lists(
        st.builds(
            PushNodeState,
            st.text(max_size=8),
            addresses,
            U64,
            st.integers(0, 3),
            st.binary(max_size=16),
        ),
        max_size=3,
    ).map(tuple),
}


def cluster_message(cls: type[Any]) -> st.SearchStrategy[Any]:
    return st.builds(cls, *(CLUSTER_FIELDS[str(f.type)] for f in dataclasses.fields(cls)))


cluster_batches = st.lists(
    st.one_of(*(cluster_message(cls) for cls in MESSAGE_CLASSES.values())), min_size=1, max_size=4
)
KEY = b"k" * 32
OTHER_KEY = b"o" * 32
SIGNED = Keyring((KEY,))
UNSIGNED = Keyring(())
LIMIT = 1 << 20  # a stream frame's room: these tests are about content, not size


@SETTINGS
@given(cluster_batches, st.booleans())
def test_every_gossip_packet_round_trips_signed_or_not(batch: list[Any], signed: bool) -> None:
    ring = SIGNED if signed else UNSIGNED
    assert codec.decode_packet(codec.encode_packet(batch, ring, LIMIT), ring, LIMIT) == batch


@SETTINGS
@given(cluster_batches, st.data())
def test_a_signed_gossip_packet_with_any_bit_flipped_is_rejected(
    batch: list[Any], data: st.DataObject
) -> None:
    packet = bytearray(codec.encode_packet(batch, SIGNED, LIMIT))
    at = data.draw(st.integers(0, len(packet) - 1))
    packet[at] ^= 1 << data.draw(st.integers(0, 7))
    expected: type[PeerProtocolError] = Unauthenticated
    if at == 0:
        expected = MalformedPacket  # the magic byte
    elif at == 1:
        expected = UnsupportedVersion
    with pytest.raises(expected):
        codec.decode_packet(bytes(packet), SIGNED, LIMIT)


@SETTINGS
@given(cluster_batches, st.booleans(), st.data())
def test_a_truncated_gossip_packet_is_rejected(
    batch: list[Any], signed: bool, data: st.DataObject
) -> None:
    ring = SIGNED if signed else UNSIGNED
    packet = codec.encode_packet(batch, ring, LIMIT)
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(
        MalformedPacket if not signed or cut <= codec.HEADER_BYTES else Unauthenticated
    ):
        codec.decode_packet(packet[:cut], ring, LIMIT)


@SETTINGS
@given(cluster_batches)
def test_unsigned_and_wrongly_signed_gossip_packets_are_rejected(batch: list[Any]) -> None:
    with pytest.raises(Unauthenticated):
        codec.decode_packet(codec.encode_packet(batch, UNSIGNED, LIMIT), SIGNED, LIMIT)
    wrong = codec.encode_packet(batch, Keyring((OTHER_KEY,)), LIMIT)
    with pytest.raises(Unauthenticated):
        codec.decode_packet(wrong, SIGNED, LIMIT)
    # Rotation: a receiver that still holds the old key accepts it.
    assert codec.decode_packet(wrong, Keyring((KEY, OTHER_KEY)), LIMIT) == batch


@SETTINGS
@given(cluster_batches)
def test_a_gossip_packet_over_the_limit_is_rejected_before_decoding(batch: list[Any]) -> None:
    packet = codec.encode_packet(batch, SIGNED, LIMIT)
    with pytest.raises(OversizedPacket):
        codec.decode_packet(packet, SIGNED, len(packet) - 1)


HEADER = bytes([codec.MAGIC, PROTOCOL_VERSION, 0])
gossip_garbage = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: HEADER + b),
    # Well-framed bodies of message-like arrays with fields of any type.
    st.lists(
        st.tuples(st.integers(-1, 12), st.lists(msgpack_values, max_size=6)).map(
            lambda t: [t[0], *t[1]]
        ),
        min_size=1,
        max_size=3,
    ).map(lambda msgs: HEADER + msgpack_frame(msgs)),
    cluster_batches.map(lambda b: codec.encode_packet(b, UNSIGNED, LIMIT)).flatmap(mutated),
    # Valid messages with one field of the wrong type or out of range.
    st.lists(
        st.one_of(*(cluster_message(cls) for cls in MESSAGE_CLASSES.values()))
        .map(codec.message_to_wire)
        .flatmap(one_field_replaced),
        min_size=1,
        max_size=3,
    ).map(lambda msgs: HEADER + msgpack_frame(msgs)),
)


@SETTINGS
@given(gossip_garbage)
def test_any_bytes_decode_to_well_typed_gossip_or_a_peer_protocol_error(data: bytes) -> None:
    try:
        messages = codec.decode_packet(data, UNSIGNED, LIMIT)
    except PeerProtocolError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("decoded")
    # Whatever decodes is well typed: it re-encodes and decodes to itself.
    assert messages
    again = codec.encode_packet(messages, UNSIGNED, LIMIT)
    assert codec.decode_packet(again, UNSIGNED, LIMIT) == messages
