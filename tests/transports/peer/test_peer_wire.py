"""The peer wire's hand-built maps encode exactly what dataclasses.asdict gives, and what a peer
sends decodes to the same value or is refused as malformed."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.types import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    InferRequest,
    InferResult,
    TensorData,
)
from cluster.keyring import Keyring
from transports.peer_wire import (
    PEER_PROTOCOL,
    Envelope,
    Op,
    PeerWireError,
    embed_from_wire,
    embed_result_from_wire,
    embed_result_to_wire,
    embed_to_wire,
    open_frames,
    request_from_wire,
    request_to_wire,
    result_from_wire,
    result_to_wire,
    seal,
)

TENSOR = TensorData("f32", (2, 3), b"\x00" * 24)


def _packed(obj: object) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def test_a_full_request_encodes_as_asdict_and_comes_back_equal() -> None:
    req = InferRequest(
        model="m",
        prompt="hi",
        messages=(ChatMessage("user", "hello"), ChatMessage("assistant", "yes")),
        tensors=(TENSOR,),
        params=GenerationParams(max_tokens=3, temperature=0.1, top_p=0.5, stop=("x",), seed=7),
        timeout_s=2.5,
    )
    wire = request_to_wire(req)
    assert _packed(wire) == _packed(dataclasses.asdict(req))
    assert request_from_wire(msgpack.unpackb(_packed(wire), raw=False)) == req


def test_the_openai_parameters_and_a_token_prompt_come_back_equal() -> None:
    req = InferRequest(
        model="m",
        prompt=(1, 72, 105),
        params=GenerationParams(
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            repeat_penalty=1.2,
            logit_bias=((72, 100.0), (5, -3.5)),
            json_schema='{"type": "object"}',
            logprobs=3,
        ),
    )
    wire = request_to_wire(req)
    assert _packed(wire) == _packed(dataclasses.asdict(req))
    assert request_from_wire(msgpack.unpackb(_packed(wire), raw=False)) == req


def test_a_result_with_logprobs_comes_back_equal() -> None:
    tokens = ((b"H", -0.25, ((b"H", -0.25), (b"\xc3", -2.0))), (b"i", -0.5, ()))
    result = InferResult("Hi", 2, 1, "length", 1.5, "v1", logprobs=tokens)
    wire = result_to_wire(result)
    assert _packed(wire) == _packed(dataclasses.asdict(result))
    assert result_from_wire(msgpack.unpackb(_packed(wire), raw=False)) == result


def test_a_bare_request_encodes_as_asdict() -> None:
    req = InferRequest(model="m", prompt="p")
    assert _packed(request_to_wire(req)) == _packed(dataclasses.asdict(req))


def test_a_result_with_tensors_encodes_as_asdict_and_comes_back_equal() -> None:
    result = InferResult("t", 1, 2, "stop", 1.5, "v1", tensors=(TENSOR,))
    wire = result_to_wire(result)
    assert _packed(wire) == _packed(dataclasses.asdict(result))
    assert result_from_wire(msgpack.unpackb(_packed(wire), raw=False)) == result
    bare = InferResult("t", 1, 2, "length", 1.5, "v1")
    assert _packed(result_to_wire(bare)) == _packed(dataclasses.asdict(bare))


embed_inputs = st.lists(
    st.one_of(
        st.text(min_size=1, max_size=20),
        st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=1, max_size=5).map(tuple),
    ),
    min_size=1,
    max_size=4,
).map(tuple)
embed_requests = st.builds(
    EmbedRequest,
    model=st.text(min_size=1, max_size=12),
    inputs=embed_inputs,
    timeout_s=st.one_of(st.none(), st.floats(min_value=0.001, max_value=1e6)),
)
embed_results = st.builds(
    EmbedResult,
    vectors=st.lists(st.binary(max_size=64), max_size=4).map(tuple),
    prompt_tokens=st.integers(min_value=0, max_value=2**31),
    latency_ms=st.floats(allow_nan=False),
    model_version=st.text(max_size=12),
)


@settings(deadline=None, max_examples=200)
@given(embed_requests, embed_results)
def test_an_embed_request_and_result_encode_as_asdict_and_come_back_equal(
    req: EmbedRequest, result: EmbedResult
) -> None:
    wire = embed_to_wire(req)
    assert _packed(wire) == _packed(dataclasses.asdict(req))
    assert embed_from_wire(msgpack.unpackb(_packed(wire), raw=False)) == req
    answer = embed_result_to_wire(result)
    assert _packed(answer) == _packed(dataclasses.asdict(result))
    assert embed_result_from_wire(msgpack.unpackb(_packed(answer), raw=False)) == result


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
              st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip
embed_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("m"), json_like),
        "inputs": st.one_of(st.lists(st.one_of(st.text(max_size=4), json_like)), json_like),
        "timeout_s": json_like,
    },
)


@settings(deadline=None, max_examples=300)
@given(st.one_of(embed_bodies, json_like))
def test_any_embed_body_decodes_to_a_request_or_is_refused_as_malformed(body: object) -> None:
    try:
        req = embed_from_wire(body)
    except PeerWireError as exc:
        assert exc.reason == "malformed"
        return
    assert req.model and req.inputs
    assert all(isinstance(i, str) and i or isinstance(i, tuple) and i for i in req.inputs)


@settings(deadline=None, max_examples=300)
@given(st.one_of(st.fixed_dictionaries({}, optional={k: json_like for k in (
    "vectors", "prompt_tokens", "latency_ms", "model_version")}), json_like))  # fmt: skip
def test_any_embed_answer_decodes_to_a_result_or_is_refused_as_malformed(body: object) -> None:
    try:
        result = embed_result_from_wire(body)
    except PeerWireError as exc:
        assert exc.reason == "malformed"
        return
    assert all(type(v) is bytes for v in result.vectors)


KEY = Keyring((b"k" * 32,))


def test_a_request_carries_its_ack_timeout_and_a_reply_none() -> None:
    now = time.time()
    request = open_frames(
        KEY,
        seal(KEY, Envelope(Op.INFER, "r", now, None, 3, 0.5, src="node-a", dst="node-b")),
        now,
        dst="node-b",
    )
    assert (request.term, request.ack_s) == (3, 0.5)
    assert (request.src, request.dst) == ("node-a", "node-b")
    reply = open_frames(
        KEY,
        seal(KEY, Envelope(Op.PING, "r", now, None, src="node-a", dst="node-b")),
        now,
        dst="node-b",
    )
    assert reply.ack_s is None
    assert (
        b"\xa1a" not in seal(KEY, Envelope(Op.PING, "r", now, None, src="node-a", dst="node-b"))[0]
    )  # absent


@pytest.mark.parametrize(
    ("dst", "src"),
    [("node-c", None), ("node-b", "node-c")],
    ids=["another-destination", "another-sender"],
)
def test_a_frame_is_refused_as_misdirected_by_any_node_but_its_destination(
    dst: str, src: str | None
) -> None:
    now = time.time()
    frames = seal(KEY, Envelope(Op.LOAD, "r", now, {"name": "m"}, 3, src="node-a", dst="node-b"))
    with pytest.raises(PeerWireError) as refused:
        open_frames(KEY, frames, now, dst=dst, src=src)
    assert refused.value.reason == "misdirected"


def test_a_frame_cannot_be_sealed_without_its_sender_and_destination() -> None:
    with pytest.raises(ValueError, match="sender and destination"):
        seal(KEY, Envelope(Op.PING, "r", time.time(), None, dst="node-b"))


def test_a_frame_of_the_previous_protocol_is_refused_as_another_version() -> None:
    # Version 1 bound a frame to nothing: all nodes of a cluster run one version.
    payload = msgpack.packb({"v": 1, "c": int(Op.PLACE), "id": "r", "ts": time.time(), "b": "m"})
    with pytest.raises(PeerWireError) as refused:
        open_frames(KEY, [payload, KEY.sign(payload)], time.time(), dst="node-b")
    assert refused.value.reason == "version"


@pytest.mark.parametrize(
    "bad", [True, -1.0, 0, "1", 1e9], ids=["bool", "negative", "zero", "text", "huge"]
)
def test_a_malformed_ack_timeout_is_refused(bad: object) -> None:
    payload = msgpack.packb(
        {"v": PEER_PROTOCOL, "c": int(Op.INFER), "id": "r", "ts": time.time(), "b": None,
         "t": None, "a": bad, "s": "node-a", "d": "node-b"}
    )  # fmt: skip
    with pytest.raises(PeerWireError) as refused:
        open_frames(KEY, [payload, KEY.sign(payload)], time.time(), dst="node-b")
    assert refused.value.reason == "malformed"


@pytest.mark.parametrize("size", [16, 64, 65, 200], ids=["short", "one-block", "over", "long"])
def test_a_frame_is_tagged_with_the_standard_hmac_sha256_of_its_payload(size: int) -> None:
    # Peers of other versions compute the tag with hmac.digest: the keyring's primed states
    # must give the very same bytes, keys longer than a block (hashed first) included.
    key = bytes(range(256))[:size]
    old = Keyring((b"o" * 32,))
    payload, tag = seal(
        Keyring((key,)), Envelope(Op.PING, "r", time.time(), {"x": 1}, src="node-a", dst="node-b")
    )
    assert tag == hmac.digest(key, payload, hashlib.sha256)
    assert Keyring((b"o" * 32, key)).verify(payload, tag)  # any key of a rotation verifies
    assert not old.verify(payload, tag)
    assert not Keyring((key,)).verify(payload + b"x", tag)


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_frame_stamped_nan_or_infinite_is_refused_as_stale(ts: float) -> None:
    # NaN compares false both ways: past a `>` skew check it reached the replay window, whose
    # expiry it stopped (the window then emptied only at its capacity).
    payload = msgpack.packb(
        {"v": PEER_PROTOCOL, "c": int(Op.PING), "id": "r", "ts": ts, "b": None, "t": None,
         "s": "node-a", "d": "node-b"}
    )  # fmt: skip
    with pytest.raises(PeerWireError) as refused:
        open_frames(KEY, [payload, KEY.sign(payload)], time.time(), dst="node-b")
    assert refused.value.reason == "stale"
