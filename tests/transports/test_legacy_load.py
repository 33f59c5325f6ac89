"""The legacy load payload: `model_type` is a kind of model ("llm"), `quantization` a boolean.

The legacy API document's example, `{"model_name": "new-model", "model_path":
"/models/new-model.gguf", "model_type": "llm", "quantization": true}`, loads a real generated
GGUF over REST and over ZeroMQ on a real node (its model directory stands in for /models).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq

from actors.errors import InvalidRequest
from actors.gguf_synth import write_preset
from moc_node.app import Runtime, build_runtime
from tests.moc_node.conftest import make_config
from transports import schema
from transports.http import HttpServer
from transports.zmq_legacy import ZmqServer

from .conftest import legacy_call, request, server_config

LEGACY_EXAMPLE: dict[str, Any] = {
    "model_name": "new-model",
    "model_path": "/models/new-model.gguf",
    "model_type": "llm",
    "quantization": True,
}
"""The load example of the legacy API document, as written there."""


# ---- the payload ----


def test_the_legacy_example_is_a_load_whose_backend_follows_from_the_file() -> None:
    req = schema.parse_load(LEGACY_EXAMPLE)
    assert (req.name, req.path, req.backend) == ("new-model", "/models/new-model.gguf", None)
    assert req.quantization is None  # the legacy boolean changes nothing: a GGUF is quantized


ACCEPTED: list[tuple[str, dict[str, Any], tuple[Any, ...]]] = [
    ("kind llm", {"model_type": "llm"}, (None, None, None)),
    ("backend gguf", {"model_type": "gguf"}, ("gguf", None, None)),
    ("backend torch", {"model_type": "torch"}, ("torch", None, None)),
    ("quantization false", {"quantization": False}, (None, None, None)),
    ("quantization named", {"quantization": "Q4_K_M"}, (None, "Q4_K_M", None)),
    ("gpu_layers all", {"gpu_layers": -1}, (None, None, -1)),
    ("gpu_layers some", {"model_type": "llm", "gpu_layers": 20}, (None, None, 20)),
]


@pytest.mark.parametrize(
    ("fields", "expected"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED]
)
def test_a_load_takes_a_kind_or_a_backend_a_quantization_and_gpu_layers(
    fields: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    req = schema.parse_load({"model_name": "m", "model_path": "m.gguf", **fields})
    assert (req.backend, req.quantization, req.gpu_layers) == expected


REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("kind not served", {"model_type": "vision"}, "model_type"),
    ("kind in capitals", {"model_type": "LLM"}, "model_type"),
    ("type not a string", {"model_type": 1}, "model_type"),
    ("quantization a number", {"quantization": 4}, "quantization"),
    ("quantization a list", {"quantization": ["q4"]}, "quantization"),
    ("gpu_layers a boolean", {"gpu_layers": True}, "gpu_layers"),
    ("gpu_layers below -1", {"gpu_layers": -2}, "gpu_layers"),
]


@pytest.mark.parametrize(
    ("fields", "field"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_a_bad_legacy_load_field_is_refused_naming_it(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema.parse_load({"model_name": "m", **fields})
    assert caught.value.field == field


def test_an_unknown_model_type_names_every_accepted_one_and_only_a_bounded_echo() -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema.parse_load({"model_name": "m", "model_type": "onnx" + "x" * 5000})
    message = str(caught.value)
    assert "llm, gguf, torch" in message
    assert len(message) < 300


# ---- on a real node, over REST and ZeroMQ ----


@dataclasses.dataclass
class Served:
    runtime: Runtime
    http: HttpServer
    zmq: ZmqServer
    models: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """A real node with an empty catalog whose model directory holds new-model.gguf."""
    models = tmp_path / "models"
    models.mkdir()
    write_preset(models / "new-model.gguf", "tiny")
    config = make_config(tmp_path, models)
    config = dataclasses.replace(config, server=server_config())
    runtime = build_runtime(config)
    http = HttpServer(runtime.node, config.server)
    zmq_server = ZmqServer(runtime.node, config.server)
    await http.start()
    await zmq_server.start()
    await runtime.node.start()
    yield Served(runtime, http, zmq_server, models)
    await http.stop()
    await zmq_server.stop()
    await runtime.close()


def example_in(models: Path, **overrides: Any) -> dict[str, Any]:
    """The legacy example with /models replaced by the node's model directory."""
    return {**LEGACY_EXAMPLE, "model_path": str(models / "new-model.gguf"), **overrides}


async def post_models(served: Served, payload: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.url}/models", json=payload) as resp,
    ):
        return resp.status, await resp.json()


async def test_the_legacy_load_example_loads_a_gguf_over_rest_and_over_zmq(
    served: Served, zmq_context: zmq.Context[Any]
) -> None:
    status, body = await post_models(served, example_in(served.models))
    assert status == 201, body
    assert body["model_name"] == "new-model" and body["memory_usage_mb"] > 0
    loaded = {m.name: m for m in served.runtime.node.models()}["new-model"]
    assert (loaded.state, loaded.backend) == ("loaded", "gguf")

    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{served.url}/models/new-model") as resp,
    ):
        assert resp.status == 200
    payload = example_in(served.models, gpu_layers=0)
    reply = await asyncio.to_thread(
        legacy_call, zmq_context, served.zmq.endpoint, request("load_model", payload, "l-1")
    )
    assert reply["success"] is True, reply
    assert reply["request_id"] == "l-1" and reply["result"]["memory_usage_mb"] > 0
    inferred = await asyncio.to_thread(
        legacy_call,
        zmq_context,
        served.zmq.endpoint,
        request("infer", {"model_name": "new-model", "input_text": "hi", "max_tokens": 2}),
    )
    assert inferred["success"] is True and inferred["result"]["tokens_generated"] >= 1


async def test_a_legacy_load_of_a_missing_file_or_an_unknown_kind_is_refused_clearly(
    served: Served, zmq_context: zmq.Context[Any]
) -> None:
    status, body = await post_models(
        served, example_in(served.models, model_path=str(served.models / "absent.gguf"))
    )
    assert status == 404 and body["success"] is False
    status, body = await post_models(served, example_in(served.models, model_type="vision"))
    assert status == 400 and body["field"] == "model_type"
    assert "llm, gguf, torch" in body["error"]
    reply = await asyncio.to_thread(
        legacy_call,
        zmq_context,
        served.zmq.endpoint,
        request("load_model", example_in(served.models, model_type="vision"), "v"),
    )
    assert reply["success"] is False and "llm, gguf, torch" in reply["error"]
    assert "new-model" not in {m.name for m in served.runtime.node.models()}
