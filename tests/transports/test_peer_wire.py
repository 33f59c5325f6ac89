"""The peer wire's hand-built maps encode exactly what dataclasses.asdict gives."""

from __future__ import annotations

import dataclasses

import msgpack

from actors.types import (
    ChatMessage,
    GenerationParams,
    InferRequest,
    InferResult,
    TensorData,
)
from transports.peer_wire import (
    request_from_wire,
    request_to_wire,
    result_from_wire,
    result_to_wire,
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
