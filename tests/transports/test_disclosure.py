"""What a client is told about the node's own files: nothing, on either front.

Against a real node (real model directories, a real state directory): a path refusal names
no directory of the node, and the open `/health` (or ZMQ `health` without a key) names no file.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import zmq

from tests.transports.conftest import legacy_call, request
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    RealNode,
    StartNode,
    outside_model_fixture,
    start_node_fixture,
    tiny_models_fixture,
)

KEY = "real-key"


@pytest.fixture(scope="module")
def zctx() -> Any:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


async def http_get(served: RealNode, path: str, key: str | None = None) -> tuple[int, Any]:
    headers = {"X-API-Key": key} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{served.url}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def node_dirs(served: RealNode) -> list[str]:
    """The directories a client must not learn: model directories and the state directory."""
    state = served.runtime.config.node.state_path
    return [str(served.model_root), str(state), str(Path(state).parent)]


async def test_a_path_refusal_names_no_directory_of_the_node_on_either_front(
    start_node: StartNode, zctx: zmq.Context[Any], outside_model: Path
) -> None:
    served = await start_node(api_keys=(KEY,))
    payload = {"model_name": "evil", "model_path": str(outside_model)}

    zmq_reply = await asyncio.to_thread(
        legacy_call, zctx, served.endpoint, request("load_model", payload)
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{served.url}/models", json=payload, headers={"X-API-Key": KEY}) as resp,
    ):
        status, http_body = resp.status, await resp.json()

    assert zmq_reply["error_code"] == "path_not_allowed"
    assert (status, http_body["code"]) == (403, "path_not_allowed")
    for answer in (json.dumps(zmq_reply), json.dumps(http_body)):
        assert "outside the model directories" in answer
        for directory in node_dirs(served):
            assert directory not in answer


async def test_the_open_health_names_no_file_and_the_keyed_one_keeps_its_details(
    start_node: StartNode, zctx: zmq.Context[Any]
) -> None:
    served = await start_node(api_keys=(KEY,))
    state = str(served.runtime.config.node.state_path)

    status, open_body = await http_get(served, "/health")
    zmq_health = await asyncio.to_thread(legacy_call, zctx, served.endpoint, request("health"))
    _, keyed = await http_get(served, "/health", KEY)

    assert status == 200
    assert state not in json.dumps(open_body)
    assert state not in json.dumps(zmq_health)
    assert set(open_body["components"]) == set(keyed["components"])
    assert all(set(c) == {"status"} for c in open_body["components"].values())
    assert any(state in c["detail"] for c in keyed["components"].values())
