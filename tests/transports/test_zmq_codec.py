"""The legacy ZeroMQ codec: pure functions over bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from transports.errors import BadFrame
from transports.zmq_codec import decode_frame, split_envelope


def test_a_req_envelope_ends_at_the_empty_delimiter() -> None:
    assert split_envelope([b"id", b"", b"body"]) == ([b"id", b""], [b"body"])


def test_a_dealer_without_delimiter_is_answered_on_its_identity_alone() -> None:
    assert split_envelope([b"id", b"body"]) == ([b"id"], [b"body"])


def test_a_frame_starting_with_a_brace_is_json_and_a_map_head_is_msgpack() -> None:
    assert decode_frame(b'{"action":"health"}') == ("json", {"action": "health"})
    assert decode_frame(msgpack.packb({"action": "health"})) == ("msgpack", {"action": "health"})


def test_a_map_that_repeats_a_key_is_a_bad_frame_naming_the_key() -> None:
    with pytest.raises(BadFrame, match="'action' twice"):
        decode_frame(b'{"action": "health", "action": "unload_model"}')


@given(st.binary(max_size=64))
def test_arbitrary_bytes_either_decode_or_raise_bad_frame(data: bytes) -> None:
    try:
        encoding, _ = decode_frame(data)
    except BadFrame:
        return
    assert encoding in ("json", "msgpack")
