"""A fake NodeAPI and real servers around it for the transport tests.

`FakeNode` is a small in-memory node that keeps the Protocol's documented behaviour (errors by
class, cold catalog models loaded on first use, a stream that ends with one InferResult and stops
generating when closed), and can be told to block, fail or run out of capacity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import zmq
from prometheus_client import REGISTRY

from actors.errors import (
    FeatureUnavailable,
    InsufficientMemory,
    MocError,
    ModelAlreadyLoaded,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    PathNotAllowed,
)
from actors.types import (
    ComponentHealth,
    DeviceInfo,
    FinishReason,
    HealthReport,
    HealthStatus,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from transports.config import ServerConfig
from transports.http import HttpServer, serve_http
from transports.zmq_legacy import ZmqServer, serve_zmq

MODEL_DIR = "/models"
TOKENS = ("Hello", ",", " world", "!", " How", " are", " you", "?")


class FakeNode:
    """An in-memory NodeAPI: models by name, a token cycle as the "model", knobs for tests."""

    def __init__(self, *, capacity: int = 1000) -> None:
        self._models: dict[str, ModelInfo] = {
            "tiny": ModelInfo(
                "tiny",
                "gguf",
                f"{MODEL_DIR}/tiny.gguf",
                "loaded",
                device="cpu",
                memory_mb=42.0,
                version="tiny-v1",
            ),
            "small": ModelInfo("small", "gguf", f"{MODEL_DIR}/small.gguf", "available"),
            "huge": ModelInfo("huge", "gguf", f"{MODEL_DIR}/huge.gguf", "available"),
        }
        self.capacity = capacity
        """Requests allowed in flight at once; one more raises Overloaded (the bulkhead)."""
        self.gate: asyncio.Event | None = None
        """When set to an unset Event, inference waits on it (infer: before generating; stream:
        after the first piece)."""
        self.fail: MocError | None = None
        """When set, every inference raises it."""
        self.tokens: tuple[str, ...] = TOKENS
        """The pieces the "model" cycles through."""
        self.ready = True
        self.health_status: HealthStatus = "healthy"
        self.in_flight = 0
        self.started = asyncio.Event()
        self.stream_closed = asyncio.Event()
        self.inference_cancelled = asyncio.Event()
        self.requests: list[InferRequest] = []

    # ---- NodeAPI ----

    async def load(self, req: LoadRequest) -> ModelInfo:
        """Load a catalog model or one by path inside MODEL_DIR."""
        current = self._models.get(req.name)
        if current is not None and current.state == "loaded":
            raise ModelAlreadyLoaded(f"model {req.name!r} is already loaded")
        if req.path is not None and not req.path.startswith(MODEL_DIR + "/"):
            raise PathNotAllowed(f"{req.path} is outside the model directories")
        if current is None and req.path is None:
            raise ModelNotFound(f"model {req.name!r} is not in the catalog")
        if req.name.startswith("huge"):
            raise InsufficientMemory(f"model {req.name!r} needs 90000 MB; 8000 MB free")
        path = req.path or (current.path if current else "")
        info = ModelInfo(
            req.name,
            req.backend or "gguf",
            path,
            "loaded",
            device="cpu",
            memory_mb=64.0,
            version=f"{req.name}-v1",
            pinned=bool(req.pin),
        )
        self._models[req.name] = info
        return info

    async def unload(self, name: str) -> ModelInfo:
        """Unload a loaded model."""
        current = self._models.get(name)
        if current is None or current.state != "loaded":
            raise ModelNotLoaded(f"model {name!r} is not loaded")
        info = dataclasses.replace(current, state="available", device=None, memory_mb=None)
        self._models[name] = info
        return info

    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo("cpu", "cpu", 16000.0, 4000.0, 42.0, 11000.0),
            DeviceInfo("sim0", "simulated", 24576.0, 0.0, 0.0, 24064.0),
        ]

    async def infer(self, req: InferRequest) -> InferResult:
        """Generate the whole text at once."""
        pieces = self._begin(req)
        try:
            self.started.set()
            if self.gate is not None:
                await self.gate.wait()
            return self._result(req, pieces)
        except asyncio.CancelledError:
            self.inference_cancelled.set()
            raise
        finally:
            self.in_flight -= 1

    def infer_stream(self, req: InferRequest) -> AsyncIterator[TokenChunk | InferResult]:
        return self._stream(req)

    async def _stream(self, req: InferRequest) -> AsyncIterator[TokenChunk | InferResult]:
        pieces = self._begin(req)
        try:
            self.started.set()
            for i, piece in enumerate(pieces):
                yield TokenChunk(piece)
                if i == 0 and self.gate is not None:
                    await self.gate.wait()
            yield self._result(req, pieces)
        finally:
            # Runs on aclose() and on cancellation alike: generation stops here.
            self.in_flight -= 1
            self.stream_closed.set()

    def health(self) -> HealthReport:
        return HealthReport(
            self.health_status,
            {"models": ComponentHealth("healthy"), "devices": ComponentHealth(self.health_status)},
        )

    def is_ready(self) -> bool:
        return self.ready

    def status(self) -> dict[str, Any]:
        return {
            "name": "fake-node",
            "version": "0.0-test",
            "uptime_s": 1.0,
            "models": [m.name for m in self._models.values() if m.state == "loaded"],
        }

    async def _unavailable(self, what: str) -> Any:
        raise FeatureUnavailable(f"{what} is not available yet on this fake node")

    async def list_jobs(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return await self._unavailable("learning")  # type: ignore[no-any-return]

    async def create_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        return await self._unavailable("learning")  # type: ignore[no-any-return]

    async def get_job(self, job_id: str) -> dict[str, Any]:
        return await self._unavailable("learning")  # type: ignore[no-any-return]

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self._unavailable("learning")  # type: ignore[no-any-return]

    async def list_goals(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        return await self._unavailable("goals")  # type: ignore[no-any-return]

    async def create_goal(self, spec: dict[str, Any]) -> dict[str, Any]:
        return await self._unavailable("goals")  # type: ignore[no-any-return]

    async def get_goal(self, goal_id: str) -> dict[str, Any]:
        return await self._unavailable("goals")  # type: ignore[no-any-return]

    async def cancel_goal(self, goal_id: str) -> dict[str, Any]:
        return await self._unavailable("goals")  # type: ignore[no-any-return]

    def cluster_view(self) -> dict[str, Any]:
        loaded = [m.name for m in self._models.values() if m.state == "loaded"]
        member = {
            "name": "fake-node",
            "state": "alive",
            "incarnation": 0,
            "devices": [],
            "models": [{"name": n, "state": "loaded"} for n in loaded],
        }
        return {
            "enabled": False,
            "self": "fake-node",
            "primary": None,
            "term": 0,
            "members": [member],
            "models": {n: ["fake-node"] for n in loaded},
        }

    # ---- the "model" ----

    def _begin(self, req: InferRequest) -> list[str]:
        """Check the request like the node does, then take a bulkhead slot."""
        if self.fail is not None:
            raise self.fail
        info = self._models.get(req.model)
        if info is None:
            raise ModelNotFound(f"model {req.model!r} does not exist")
        if self.in_flight >= self.capacity:
            raise Overloaded(f"model {req.model!r} is busy", retry_after=2.0)
        if info.state != "loaded":  # a cold catalog model is loaded first
            self._models[req.model] = dataclasses.replace(info, state="loaded", device="cpu")
        self.requests.append(req)
        self.in_flight += 1
        return generate(req, self.tokens)

    def _result(self, req: InferRequest, pieces: list[str]) -> InferResult:
        text = "".join(pieces)
        finish: FinishReason = "length" if len(pieces) == req.params.max_tokens else "stop"
        prompt = (
            req.prompt
            if req.prompt is not None
            else " ".join(m.content for m in req.messages or ())
        )
        return InferResult(text, len(pieces), len(prompt.split()), finish, 1.5, f"{req.model}-v1")


def generate(req: InferRequest, tokens: tuple[str, ...] = TOKENS) -> list[str]:
    """Return the pieces the fake model emits: the token cycle, cut at a stop sequence."""
    cycle = [tokens[i % len(tokens)] for i in range(req.params.max_tokens)]
    if not req.params.stop:
        return cycle
    pieces: list[str] = []
    text = ""
    for piece in cycle:
        candidate = text + piece
        cuts = [cut for cut in (candidate.find(stop) for stop in req.params.stop) if cut >= 0]
        if cuts:
            tail = candidate[len(text) : min(cuts)]
            if tail:
                pieces.append(tail)
            return pieces
        pieces.append(piece)
        text = candidate
    return pieces


# ---- fixtures ----


@pytest.fixture
def node() -> FakeNode:
    return FakeNode()


def server_config(**overrides: Any) -> ServerConfig:
    """A config on loopback with free ports and short grace periods."""
    base = ServerConfig(
        host="127.0.0.1", zmq_port=0, rest_port=0, grpc_port=0, shutdown_timeout_s=2.0
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
async def start_zmq() -> AsyncIterator[Callable[..., Awaitable[ZmqServer]]]:
    """Start ZMQ servers with config overrides; stop them all at teardown."""
    servers: list[ZmqServer] = []

    async def start(node: FakeNode, **overrides: Any) -> ZmqServer:
        server = await serve_zmq(node, server_config(**overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def start_http() -> AsyncIterator[Callable[..., Awaitable[HttpServer]]]:
    """Start HTTP servers with config overrides; stop them all at teardown."""
    servers: list[HttpServer] = []

    async def start(node: FakeNode, **overrides: Any) -> HttpServer:
        server = await serve_http(node, server_config(**overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def zmq_server(node: FakeNode, start_zmq: Any) -> ZmqServer:
    server: ZmqServer = await start_zmq(node)
    return server


@pytest.fixture
async def http_server(node: FakeNode, start_http: Any) -> HttpServer:
    server: HttpServer = await start_http(node)
    return server


# ---- clients ----


@pytest.fixture(scope="session")
def zmq_context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.term()


def legacy_call(
    ctx: zmq.Context[Any], endpoint: str, message: Any, *, timeout_ms: int = 10_000
) -> Any:
    """Do one request as a legacy agent does: a plain REQ socket, send_json, recv_json."""
    return json.loads(
        raw_call(ctx, endpoint, [json.dumps(message).encode()], timeout_ms=timeout_ms)
    )


def raw_call(
    ctx: zmq.Context[Any], endpoint: str, frames: list[bytes], *, timeout_ms: int = 10_000
) -> bytes:
    """Send `frames` as one request from a plain REQ socket; return the reply's bytes."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        reply: bytes = sock.recv()
        return reply
    finally:
        sock.close()


def request(
    action: str, payload: dict[str, Any] | None = None, request_id: str = "r-1"
) -> dict[str, Any]:
    """Build a legacy request message."""
    return {
        "action": action,
        "payload": payload or {},
        "request_id": request_id,
        "timestamp": "2024-05-01T12:00:00Z",
    }


def metric(name: str, **labels: str) -> float:
    """Read one sample of the default registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0

