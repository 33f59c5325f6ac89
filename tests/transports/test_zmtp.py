"""The ZMTP 3.1 codec, byte by byte, without sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transports.zmtp import (
    GREETING_BYTES,
    Decoder,
    Ping,
    Ready,
    ZmtpError,
    command,
    encode_message,
    greeting,
    pong,
    ready,
)

HANDSHAKE = greeting(as_server=False) + ready("DEALER", b"me")


def decoder(max_frame_bytes: int = 1 << 20) -> Decoder:
    return Decoder(max_frame_bytes=max_frame_bytes, max_frames=4)


def test_the_greeting_is_64_bytes_of_signature_version_3_1_and_the_null_mechanism() -> None:
    g = greeting(as_server=True)
    assert len(g) == GREETING_BYTES
    assert g[0] == 0xFF and g[9] == 0x7F and g[10:12] == b"\x03\x01"
    assert g[12:32] == b"NULL" + bytes(16) and g[32] == 1 and g[33:] == bytes(31)


def test_ready_carries_the_socket_type_and_identity_as_the_spec_lays_them_out() -> None:
    # 37/ZMTP: %x04 size %d5 "READY" then name-len name value-len(4, network order) value
    assert ready("ROUTER") == b"\x04\x1c\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER"
    events = decoder().feed(HANDSHAKE)
    assert events == [Ready("DEALER", b"me")]


def test_messages_round_trip_with_short_and_long_frames_fed_in_one_go() -> None:
    d = decoder()
    big = bytes(range(256)) * 10  # over 255 bytes: an 8-byte size
    wire = HANDSHAKE + encode_message([b"a", big]) + encode_message([b""])
    assert d.feed(wire) == [Ready("DEALER", b"me"), [b"a", big], [b""]]


def test_a_stream_cut_at_every_byte_gives_the_same_events() -> None:
    wire = HANDSHAKE + encode_message([b"x" * 300, b"tag"]) + command(b"PING", b"\x00\x0actx")
    d = decoder()
    events = []
    for i in range(len(wire)):
        events += d.feed(wire[i : i + 1])
    assert events == [Ready("DEALER", b"me"), [b"x" * 300, b"tag"], Ping(b"ctx")]


def test_a_ping_is_reported_and_a_pong_or_unknown_command_is_ignored() -> None:
    d = decoder()
    d.feed(HANDSHAKE)
    assert d.feed(command(b"PING", b"\x00\x0a")) == [Ping(b"")]
    assert d.feed(pong(b"ctx") + command(b"SUBSCRIBE", b"x")) == []


def test_a_frame_over_the_limit_is_refused_from_its_size_before_its_body_arrives() -> None:
    d = decoder(max_frame_bytes=1000)
    d.feed(HANDSHAKE)
    head = b"\x02" + (1 << 40).to_bytes(8, "big")  # claims a terabyte; sends nothing more
    with pytest.raises(ZmtpError) as caught:
        d.feed(head)
    assert caught.value.reason == "oversized"


@pytest.mark.parametrize(
    ("wire", "says"),
    [
        (b"GET / HTTP/1.1\r\n", "not a ZMTP greeting"),
        (b"\xff" + bytes(8) + b"\x7e" + bytes(54), "not a ZMTP greeting"),  # ZMTP 1.0
        (greeting(False)[:10] + b"\x02\x00" + greeting(False)[12:], "version 3 or later"),
        (greeting(False)[:12] + b"CURVE".ljust(20, b"\x00") + bytes(32), "'CURVE'"),
        (greeting(False) + encode_message([b"hi"]), "before the READY"),
        (greeting(False) + command(b"PING", b"\x00\x01"), "before READY"),
        (greeting(False) + command(b"READY", b""), "without a Socket-Type"),
        (greeting(False) + command(b"READY", b"\x0bSocket-Type\x00\x00\x00\x09DEAL"), "cut short"),
        (HANDSHAKE + ready("DEALER"), "a second READY"),
        (HANDSHAKE + b"\x10\x01x", "reserved frame flags"),
        (HANDSHAKE + b"\x01\x01a" * 4 + b"\x00\x01z", "more than 4 frames"),
        (HANDSHAKE + command(b"ERROR", b"\x04nope"), "reported an error: nope"),
        (HANDSHAKE + b"\x04\x00", "without a name"),
    ],
    ids=[
        "http",
        "zmtp-1.0",
        "zmtp-2",
        "curve",
        "message-before-ready",
        "command-before-ready",
        "ready-without-type",
        "ready-cut-short",
        "second-ready",
        "reserved-flags",
        "too-many-frames",
        "peer-error",
        "nameless-command",
    ],
)
def test_what_is_not_zmtp_3_with_null_security_is_refused_as_malformed(
    wire: bytes, says: str
) -> None:
    with pytest.raises(ZmtpError, match=says) as caught:
        decoder().feed(wire)
    assert caught.value.reason == "malformed"


def test_a_wrong_signature_is_refused_from_its_first_byte() -> None:
    with pytest.raises(ZmtpError):
        decoder().feed(b"G")


@settings(deadline=None, max_examples=300)
@given(
    st.binary(max_size=600),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20),
    st.booleans(),
)
def test_any_bytes_in_any_pieces_give_events_or_a_zmtp_error_and_nothing_else(
    garbage: bytes, cuts: list[int], after_handshake: bool
) -> None:
    # What a peer sends is refused with ZmtpError (counted, connection closed), never with an
    # IndexError or struct.error that would escape as a bug.
    wire = (HANDSHAKE if after_handshake else b"") + garbage
    d = decoder(max_frame_bytes=300)
    pos = 0
    try:
        for cut in itertools.cycle(cuts):
            if pos >= len(wire):
                break
            for event in d.feed(wire[pos : pos + cut]):
                assert isinstance(event, list | Ready | Ping)
            pos += cut
    except ZmtpError as exc:
        assert exc.reason in ("malformed", "oversized")


@settings(deadline=None, max_examples=100)
@given(st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=4), max_size=8), st.data())
def test_messages_encoded_and_fed_in_random_pieces_come_back_whole(
    messages: list[list[bytes]], data: st.DataObject
) -> None:
    wire = HANDSHAKE + b"".join(encode_message(m) for m in messages)
    d = decoder()
    got: list[object] = []
    pos = 0
    while pos < len(wire):
        cut = data.draw(st.integers(min_value=1, max_value=len(wire) - pos))
        got += d.feed(wire[pos : pos + cut])
        pos += cut
    assert got == [Ready("DEALER", b"me"), *messages]
