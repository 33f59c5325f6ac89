"""Torch models over the client fronts: `input_tensors` in, `output_tensors` out.

The parsing is checked on its own, then a real node (real worker running a TorchScript program)
is called over ZMQ in JSON and msgpack and over HTTP, and must give what torch gives in process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from actors.errors import InvalidRequest
from actors.types import TensorData
from tests.transports.conftest import raw_call, request
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    StartNode,
    start_node_fixture,
    tiny_models_fixture,
)
from transports.schema import parse_infer
from transports.tensors import MAX_TENSORS, parse_tensors, tensor_view

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 7.0


def wire(array: np.ndarray, *, as_bytes: bool = False) -> dict[str, Any]:
    data = array.tobytes()
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": data if as_bytes else base64.b64encode(data).decode(),
    }


def from_wire(view: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(view["data"])
    return np.frombuffer(data, dtype=view["dtype"]).reshape(view["shape"])


def test_a_tensor_arrives_the_same_from_base64_text_and_from_msgpack_bytes() -> None:
    (text,) = parse_tensors([wire(X)], "t")
    (raw,) = parse_tensors([wire(X, as_bytes=True)], "t")
    assert text == raw == TensorData("float32", (2, 4), X.tobytes())


def test_an_output_tensor_goes_back_as_base64_that_decodes_to_the_same_array() -> None:
    view = tensor_view(TensorData("float32", (2, 4), X.tobytes()))
    json.dumps(view)  # one shape for both encodings: plain JSON types only
    np.testing.assert_array_equal(from_wire(view), X)


@pytest.mark.parametrize(
    ("tensors", "field", "message"),
    [
        ("not a list", "t", "expected a list"),
        ([], "t", f"expected 1 to {MAX_TENSORS} tensors"),
        ([wire(X)] * (MAX_TENSORS + 1), "t", f"expected 1 to {MAX_TENSORS} tensors"),
        ([7], "t[0]", "expected an object"),
        ([{**wire(X), "dtype": "complex64"}], "t[0].dtype", "must be one of"),
        ([{**wire(X), "shape": [2, -4]}], "t[0].shape", "non-negative"),
        ([{**wire(X), "shape": [True, 4]}], "t[0].shape", "non-negative"),
        ([{**wire(X), "shape": [1] * 9}], "t[0].shape", "at most 8"),
        ([{**wire(X), "data": "@@not base64@@"}], "t[0].data", "not valid base64"),
        ([{**wire(X), "data": 12}], "t[0].data", "expected base64"),
        (
            [{**wire(X), "shape": [3, 4]}],
            "t[0].data",
            "has 32 bytes; float32 of shape [3, 4] needs 48",
        ),
    ],
)
def test_a_malformed_tensor_is_refused_naming_the_field(
    tensors: Any, field: str, message: str
) -> None:
    with pytest.raises(
        InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")
    ) as err:
        parse_tensors(tensors, "t")
    assert err.value.field == field


def test_an_infer_payload_takes_text_or_tensors_but_not_both() -> None:
    req = parse_infer({"model_name": "m", "input_tensors": [wire(X)]})
    assert req.prompt is None and req.tensors is not None
    with pytest.raises(InvalidRequest, match="not both"):
        parse_infer({"model_name": "m", "input_text": "hi", "input_tensors": [wire(X)]})
    with pytest.raises(InvalidRequest, match="input_text: is required"):
        parse_infer({"model_name": "m"})


@pytest.fixture(name="affine_pt")
def affine_pt_fixture(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A traced affine+tanh module in the first node's own models dir, and its answer for X."""
    import torch

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)

    def affine(x: Any) -> Any:
        return torch.tanh(x @ weight + bias)

    models = tmp_path / "node0" / "state" / "models"  # start_node's first node's state dir
    models.mkdir(parents=True)
    path = models / "affine.pt"
    torch.jit.trace(affine, torch.zeros(1, 4)).save(str(path))
    return path, affine(torch.from_numpy(X)).numpy()


def _zmq_exchange(endpoint: str, frame: bytes) -> bytes:
    return raw_call(zmq.Context.instance(), endpoint, [frame], timeout_ms=60_000)


def _http_post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit: what legacy fleets ship
async def test_a_torch_model_answers_tensors_over_zmq_json_msgpack_and_http(
    start_node: StartNode, affine_pt: tuple[Path, np.ndarray]
) -> None:
    path, expected = affine_pt
    served = await start_node()
    load = {"model_name": "affine", "model_path": str(path), "model_type": "torch"}
    loaded = json.loads(
        await asyncio.to_thread(
            _zmq_exchange, served.endpoint, json.dumps(request("load_model", load, "l")).encode()
        )
    )
    assert loaded["success"], loaded

    payload = {"model_name": "affine", "input_tensors": [wire(X)]}
    as_json = json.loads(
        await asyncio.to_thread(
            _zmq_exchange, served.endpoint, json.dumps(request("infer", payload, "j")).encode()
        )
    )
    raw_payload = {"model_name": "affine", "input_tensors": [wire(X, as_bytes=True)]}
    as_msgpack = msgpack.unpackb(
        await asyncio.to_thread(
            _zmq_exchange, served.endpoint, msgpack.packb(request("infer", raw_payload, "m"))
        ),
        raw=False,
    )
    over_http = await asyncio.to_thread(_http_post, f"{served.url}/inference", payload)

    for result in (as_json["result"], as_msgpack["result"], over_http):
        (out,) = result["output_tensors"]
        assert out["dtype"] == "float32" and out["shape"] == [2, 3]
        np.testing.assert_array_equal(from_wire(out), expected)

    wrong = {"model_name": "affine", "input_tensors": [wire(np.zeros((2, 5), np.float32))]}
    refused = json.loads(
        await asyncio.to_thread(
            _zmq_exchange, served.endpoint, json.dumps(request("infer", wrong, "w")).encode()
        )
    )
    assert not refused["success"] and refused["error_code"] == "invalid_request"
    assert "rejected its inputs" in refused["error"]
