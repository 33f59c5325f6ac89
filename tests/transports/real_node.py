"""Fixtures that serve a real Node (real actors, real llama.cpp workers) over the real fronts.

The node is built with `moc_node.app.build_runtime` on generated tiny GGUF models and served
in-process by `HttpServer`, `ZmqServer` and `GrpcServer` on free loopback ports, as `moc-node run` wires them.
Test modules import the fixtures they use from here (the `*_fixture` functions; pytest knows
them by the name without the suffix).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.gguf_synth import write_preset
from actors.serving.config import BulkheadConfig, CatalogEntry
from moc_node.app import Runtime, build_runtime
from moc_node.node import Node
from tests.moc_node.conftest import make_config
from tests.transports.conftest import server_config
from transports.grpc_server import GrpcServer
from transports.http import HttpServer
from transports.zmq_legacy import ZmqServer

MODEL = "a"
"""The catalog model every served node preloads."""
N_CTX = 2048
"""Room for a long stream (about 2000 tokens, several seconds on the tiny model)."""


@dataclass
class RealNode:
    """A running node and the fronts serving it."""

    runtime: Runtime
    http: HttpServer
    zmq: ZmqServer
    grpc: GrpcServer
    model_root: Path

    @property
    def node(self) -> Node:
        return self.runtime.node

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def endpoint(self) -> str:
        return self.zmq.endpoint

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc.port}"

    def in_flight(self, model: str = MODEL) -> int:
        """Requests the model's bulkhead holds now."""
        return next((m.in_flight for m in self.node.models() if m.name == model), 0)


StartNode = Callable[..., Awaitable[RealNode]]


@pytest.fixture(scope="session", name="tiny_models")
def tiny_models_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the tiny models a.gguf and b.gguf (different seeds); treat as read-only."""
    root = tmp_path_factory.mktemp("real-node-models")
    for seed, name in enumerate("ab"):
        write_preset(root / f"{name}.gguf", "tiny", seed=seed)
    return root


@pytest.fixture(name="outside_model")
def outside_model_fixture(tmp_path: Path, tiny_models: Path) -> Path:
    """A real model file that lies outside the node's model directories."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return Path(shutil.copy(tiny_models / "b.gguf", elsewhere / "b.gguf"))


@pytest.fixture(name="start_node")
async def start_node_fixture(tmp_path: Path, tiny_models: Path) -> AsyncIterator[StartNode]:
    """Start real nodes (model "a" preloaded) with the given options; stop them at teardown."""
    running: list[RealNode] = []

    async def start(
        *,
        bulkhead: BulkheadConfig | None = None,
        api_keys: tuple[str, ...] = (),
        start_models: bool = True,
        **server: Any,
    ) -> RealNode:
        """`start_models` False: the fronts serve, the node is not started (not ready) yet;
        `server`: more [server] keys."""
        entry = CatalogEntry(
            name=MODEL, path=str(tiny_models / f"{MODEL}.gguf"), n_ctx=N_CTX, preload=True
        )
        config = make_config(
            tmp_path / f"node{len(running)}", tiny_models, catalog=(entry,), bulkhead=bulkhead
        )
        config = dataclasses.replace(config, server=server_config(api_keys=api_keys, **server))
        runtime = build_runtime(config)
        http = HttpServer(runtime.node, config.server)
        zmq_server = ZmqServer(runtime.node, config.server)
        grpc_server = GrpcServer(runtime.node, config.server)
        served = RealNode(runtime, http, zmq_server, grpc_server, tiny_models)
        running.append(served)
        # Fronts first, as the app does: /ready answers 503 while the models are restored.
        await http.start()
        await zmq_server.start()
        await grpc_server.start()
        if not start_models:
            return served
        await runtime.node.start()
        return served

    yield start
    for served in reversed(running):
        await served.http.stop()
        await served.zmq.stop()
        await served.grpc.stop()
        await served.runtime.close()
