"""What the peer RPC tests share: a fake handler, sealed envelopes, a raw requester."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import msgpack
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from actors.errors import InvalidRequest, ModelNotFound, Overloaded
from actors.types import (
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    InferRequest,
    InferResult,
    LoadRequest,
    ModelInfo,
    TokenChunk,
)
from cluster.keyring import Keyring
from transports.peer import PeerAddress, PeerServer
from transports.peer_wire import (
    Envelope,
    Op,
    load_to_wire,
    open_frames,
    request_to_wire,
    seal,
)

KEY = Keyring((b"k" * 32,))
OTHER_KEY = Keyring((b"x" * 32,))
SERVER = "node-b"
CLIENT = "node-a"


def at(server: PeerServer) -> PeerAddress:
    return PeerAddress(server.name, f"127.0.0.1:{server.port}")


def silent_at(port: int) -> PeerAddress:
    """A peer at `port` that is not a PeerServer (silent, or nobody listening)."""
    return PeerAddress(SERVER, f"127.0.0.1:{port}")


def env(code: int, rid: str, ts: float, body: object = None, *args: object) -> Envelope:
    """A request from CLIENT sealed for SERVER."""
    return Envelope(code, rid, ts, body, *args, src=CLIENT, dst=SERVER)  # type: ignore[arg-type]


class FakePeerHandler:
    """Serves model "m"; "slow" streams until cancelled; "held" answers when released; anything
    else is not found."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.release = asyncio.Event()
        self.loads: list[tuple[str, int | None]] = []
        self.calls: list[tuple[str, str]] = []
        """(operation, model) of every request the handler was asked to carry out."""

    async def peer_infer(self, req: InferRequest) -> InferResult:
        self.calls.append(("infer", req.model))
        if req.model == "held":  # answers only once the test releases it
            await self.release.wait()
            return InferResult("released", 1, 1, "length", 1.0, "v1")
        if req.model == "busy":
            raise Overloaded("model 'busy' is overloaded", retry_after=3.0)
        if req.params.max_tokens > 100:
            raise InvalidRequest("max_tokens", "too many")
        if req.model != "m":
            raise ModelNotFound(f"model {req.model!r} is not here")
        return InferResult(req.prompt if isinstance(req.prompt, str) else "", 1, 1, "length", 1.0, "v1")

    async def peer_infer_stream(
        self, req: InferRequest
    ) -> AsyncGenerator[TokenChunk | InferResult, None]:
        try:
            for i in range(1_000_000 if req.model == "slow" else 3):
                yield TokenChunk(f"t{i} ")
                await asyncio.sleep(0)
            yield InferResult("t0 t1 t2 ", 3, 1, "length", 1.0, "v1")
        finally:
            self.closed.set()

    async def peer_embed(self, req: EmbedRequest) -> EmbedResult:
        """One vector per input: its text (or token ids as bytes), so a test can tell them apart."""
        self.calls.append(("embed", req.model))
        if req.model != "m":
            raise ModelNotFound(f"model {req.model!r} is not here")
        vectors = tuple(i.encode() if isinstance(i, str) else bytes(i) for i in req.inputs)
        return EmbedResult(vectors, len(req.inputs), 1.5, "v1")

    async def peer_place(self, model: str) -> str:
        self.calls.append(("place", model))
        return f"holder-of-{model}"

    async def peer_restore(self, model: str, node: str) -> str:
        self.calls.append(("restore", model))
        return node

    async def peer_load(self, req: LoadRequest, term: int | None) -> ModelInfo:
        self.calls.append(("load", req.name))
        self.loads.append((req.name, term))
        return ModelInfo(name=req.name, backend="gguf", path="/m", state="loaded")


def req(model: str = "m", text: str = "hi", max_tokens: int = 5) -> InferRequest:
    return InferRequest(model=model, prompt=text, params=GenerationParams(max_tokens=max_tokens))


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("moc_peer_messages_dropped_total", {"reason": reason}) or 0.0


def signed(fields: dict[str, object]) -> list[bytes]:
    """Frames of a payload built by hand (a shape `seal` does not make), signed with KEY."""
    payload = msgpack.packb(fields, use_bin_type=True)
    return [payload, KEY.sign(payload)]


class RawRequester:
    """A bare DEALER socket: sends one request, reads the peer's replies frame by frame."""

    def __init__(self, port: int) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://127.0.0.1:{port}")

    async def send(self, model: str, ack_s: float | None, op: Op = Op.INFER) -> None:
        body = (
            load_to_wire(LoadRequest(name=model)) if op == Op.LOAD else request_to_wire(req(model))
        )
        await self.sock.send_multipart(seal(KEY, env(op, "r1", time.time(), body, 1, ack_s)))

    async def reply(self, timeout: float = 5.0) -> Envelope:
        assert await self.sock.poll(int(timeout * 1000)), "no reply"
        frames = await self.sock.recv_multipart()
        return open_frames(KEY, frames, time.time(), dst=CLIENT, src=SERVER)

    async def silent(self) -> bool:
        return not await self.sock.poll(100)
