"""The peer RPC's wire format: msgpack envelopes signed with the cluster key.

A frame is `[payload, tag]` where `tag = HMAC-SHA256(payload)` under the cluster keyring (first key
signs, any key verifies). The payload is a msgpack map with a protocol version, an operation or
reply kind, a request id, a timestamp, the sender's and the destination's node names, and a body.
Replay defence: a frame stamped more than MAX_SKEW_S from the receiver's clock is refused, one
sealed for another node is refused (`misdirected`: a frame captured on its way to B cannot be
sent to C), and within the skew the receiver's replay window (transports/replay_window.py)
refuses a request id it has taken before. Domain values (InferRequest, InferResult, LoadRequest,
EmbedRequest, EmbedResult) are converted here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from dataclasses import dataclass
from typing import Any

import msgpack

from actors import errors as domain_errors
from actors.errors import MocError
from actors.types import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    GenerationParams,
    InferRequest,
    InferResult,
    LoadRequest,
    TensorData,
    TokenChunk,
    TokenLogprob,
)
from cluster.keyring import TAG_BYTES, Keyring

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_SKEW_S",
    "MAX_ZMTP_FRAME_BYTES",
    "PEER_PROTOCOL",
    "Envelope",
    "embed_from_wire",
    "embed_result_from_wire",
    "embed_result_to_wire",
    "embed_to_wire",
    "error_from_wire",
    "error_to_wire",
    "Kind",
    "load_from_wire",
    "load_to_wire",
    "Op",
    "open_frames",
    "PeerUnavailable",
    "PeerWireError",
    "request_from_wire",
    "request_to_wire",
    "result_from_wire",
    "result_to_wire",
    "seal",
    "token_from_wire",
]

PEER_PROTOCOL = 2
"""2: frames name their sender and destination ("s", "d"). A node refuses frames of any other
version (counted as reason="version"): all nodes of a cluster run the same version."""
MAX_SKEW_S = 30.0
MAX_FRAME_BYTES = 8 * 1024 * 1024
"""Largest sealed payload `open_frames` reads; a larger one is refused (reason "oversized")."""
MAX_ZMTP_FRAME_BYTES = 16 * 1024 * 1024
"""A ZMTP frame larger than this drops its connection (libzmq's MAXMSGSIZE, as set before)."""

_local = threading.local()


def _packer() -> msgpack.Packer:
    """Return this thread's Packer: `msgpack.packb` builds one per call, and its 256 KiB
    buffer along with it (measured: a cold seal 35 us cheaper with the Packer kept)."""
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


class Op(enum.IntEnum):
    """Requests. Append only: these numbers are on the wire."""

    PING = 1
    INFER = 2
    STREAM = 3
    LOAD = 4
    CANCEL = 5
    PLACE = 6
    RESTORE = 7
    EMBED = 8


class Kind(enum.IntEnum):
    """Replies. Append only: these numbers are on the wire."""

    ACK = 1
    TOKEN = 2
    RESULT = 3
    ERROR = 4
    PONG = 5


class PeerWireError(Exception):
    """A frame from a peer was refused; `reason` labels the drop in metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerUnavailable(MocError):
    """The peer did not acknowledge the request in time (it is down or unreachable)."""

    code = "peer_unavailable"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One decoded frame."""

    code: int  # an Op for requests, a Kind for replies
    request_id: str
    """Unique per sender (its nonce): a receiver takes a request id from a sender once."""
    ts: float
    body: Any
    term: int | None = None
    ack_s: float | None = None
    """On a request: the requester's ack timeout. The holder answers within a fraction of it,
    or acknowledges then; absent, it acknowledges at once."""
    src: str = dataclasses.field(default="", kw_only=True)
    """The sender's node name (a reply goes back to it)."""
    dst: str = dataclasses.field(default="", kw_only=True)
    """The node the frame is sealed for: any other refuses it."""


def seal(keyring: Keyring, env: Envelope) -> list[bytes]:
    """Encode and sign an envelope into frames."""
    if not env.src or not env.dst:
        raise ValueError("a peer frame names its sender and destination")
    fields = {
        "v": PEER_PROTOCOL,
        "c": env.code,
        "id": env.request_id,
        "ts": env.ts,
        "b": env.body,
        "t": env.term,
        "s": env.src,
        "d": env.dst,
    }
    if env.ack_s is not None:  # only requests carry it
        fields["a"] = env.ack_s
    payload: bytes = _packer().pack(fields)
    tag = keyring.sign(payload) if keyring.enabled else b""
    return [payload, tag]


def open_frames(
    keyring: Keyring, frames: list[bytes], now: float, *, dst: str, src: str | None = None
) -> Envelope:
    """Verify and decode frames sealed for node `dst` (by node `src`, when given); raise
    PeerWireError naming why a frame is refused."""
    if len(frames) != 2:
        raise PeerWireError("malformed", f"expected 2 frames, got {len(frames)}")
    payload, tag = frames
    if len(payload) > MAX_FRAME_BYTES:
        raise PeerWireError("oversized", "frame larger than the peer limit")
    if keyring.enabled and (len(tag) != TAG_BYTES or not keyring.verify(payload, tag)):
        raise PeerWireError("unauthenticated", "bad or missing signature")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise PeerWireError("malformed", f"not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise PeerWireError("malformed", "payload is not a map")
    if obj.get("v") != PEER_PROTOCOL:
        raise PeerWireError("version", f"unsupported peer protocol {obj.get('v')!r}")
    code, rid, ts, term = obj.get("c"), obj.get("id"), obj.get("ts"), obj.get("t")
    if not isinstance(code, int) or not isinstance(rid, str) or not isinstance(ts, int | float):
        raise PeerWireError("malformed", "missing code, id or timestamp")
    if not abs(now - ts) <= MAX_SKEW_S:  # written so that a NaN stamp is refused too
        raise PeerWireError("stale", f"timestamp {now - ts:+.1f} s off")
    sender, to = obj.get("s"), obj.get("d")
    if not isinstance(sender, str) or not sender or not isinstance(to, str) or not to:
        raise PeerWireError("malformed", "missing sender or destination")
    if to != dst or (src is not None and sender != src):
        raise PeerWireError(
            "misdirected", f"frame from {sender[:64]!r} to {to[:64]!r} reached {dst!r}"
        )
    if term is not None and not isinstance(term, int):
        raise PeerWireError("malformed", "term is not an integer")
    ack_s = obj.get("a")
    if ack_s is not None and (
        isinstance(ack_s, bool) or not isinstance(ack_s, int | float) or not 0 < ack_s < 3600
    ):
        raise PeerWireError("malformed", "ack timeout is not a positive number of seconds")
    return Envelope(
        code,
        rid,
        float(ts),
        obj.get("b"),
        term,
        None if ack_s is None else float(ack_s),
        src=sender,
        dst=to,
    )


# -- domain values <-> plain data -----------------------------------------------------------


def request_to_wire(req: InferRequest) -> dict[str, Any]:
    """Return the request as a map (what dataclasses.asdict gives, built without its deep copy)."""
    p = req.params
    return {
        "model": req.model,
        "prompt": req.prompt,
        "messages": None
        if req.messages is None
        else tuple({"role": m.role, "content": m.content} for m in req.messages),
        "tensors": None if req.tensors is None else tuple(_tensor_to_wire(t) for t in req.tensors),
        "params": {
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stop": p.stop,
            "seed": p.seed,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "repeat_penalty": p.repeat_penalty,
            "logit_bias": p.logit_bias,
            "json_schema": p.json_schema,
            "logprobs": p.logprobs,
        },
        "timeout_s": req.timeout_s,
    }


def _tensor_to_wire(t: TensorData) -> dict[str, Any]:
    return {"dtype": t.dtype, "shape": t.shape, "data": t.data}


def request_from_wire(body: Any) -> InferRequest:
    """Rebuild an InferRequest from a peer's body; PeerWireError if it does not fit."""
    try:
        raw = body["params"]
        params = GenerationParams(
            **{
                **raw,
                "stop": tuple(raw["stop"]),
                "logit_bias": tuple((int(t), float(b)) for t, b in raw.get("logit_bias", ())),
            }
        )
        prompt = body.get("prompt")
        messages = body.get("messages")
        tensors = body.get("tensors")
        return InferRequest(
            model=str(body["model"]),
            prompt=tuple(int(t) for t in prompt) if isinstance(prompt, list) else prompt,
            messages=None if messages is None else tuple(ChatMessage(**m) for m in messages),
            tensors=None if tensors is None else tuple(_tensor(t) for t in tensors),
            params=params,
            timeout_s=body.get("timeout_s"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PeerWireError("malformed", f"bad inference request: {exc!r}") from None


def _tensor(t: dict[str, Any]) -> TensorData:
    return TensorData(str(t["dtype"]), tuple(int(d) for d in t["shape"]), bytes(t["data"]))


def result_to_wire(result: InferResult) -> dict[str, Any]:
    """Return the result as a map (what dataclasses.asdict gives, built without its deep copy)."""
    return {
        "text": result.text,
        "tokens_generated": result.tokens_generated,
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "latency_ms": result.latency_ms,
        "model_version": result.model_version,
        "tensors": None
        if result.tensors is None
        else tuple(_tensor_to_wire(t) for t in result.tensors),
        "prompt_tokens_reused": result.prompt_tokens_reused,
        "first_token_ms": result.first_token_ms,
        "logprobs": result.logprobs,
    }


def result_from_wire(body: Any) -> InferResult:
    try:
        tensors = body.get("tensors")
        logprobs = body.get("logprobs")
        return InferResult(
            **{
                **body,
                "tensors": None if tensors is None else tuple(_tensor(t) for t in tensors),
                "logprobs": None if logprobs is None else tuple(_logprob(t) for t in logprobs),
            }
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise PeerWireError("malformed", f"bad inference result: {exc!r}") from None


def _logprob(t: Any) -> TokenLogprob:
    piece, logprob, top = t
    return bytes(piece), float(logprob), tuple((bytes(p), float(lp)) for p, lp in top)


def token_from_wire(body: Any) -> TokenChunk:
    if not isinstance(body, str):
        raise PeerWireError("malformed", "token body is not text")
    return TokenChunk(body)


def embed_to_wire(req: EmbedRequest) -> dict[str, Any]:
    """Return the request as a map (what dataclasses.asdict gives)."""
    return {"model": req.model, "inputs": req.inputs, "timeout_s": req.timeout_s}


def embed_from_wire(body: Any) -> EmbedRequest:
    """Rebuild an EmbedRequest from a peer's body; PeerWireError if it does not fit.

    Checked field by field, not by the dataclass: a string iterates as characters and a
    boolean is an integer, so a wrong type would otherwise pass as something else.
    """
    if not isinstance(body, dict):
        raise PeerWireError("malformed", "bad embeddings request: not a map")
    model, inputs, timeout_s = body.get("model"), body.get("inputs"), body.get("timeout_s")
    if not isinstance(model, str) or not model:
        raise PeerWireError("malformed", "bad embeddings request: no model name")
    if not isinstance(inputs, list) or not inputs:
        raise PeerWireError("malformed", "bad embeddings request: inputs is not a non-empty list")
    if timeout_s is not None and not _seconds(timeout_s):
        raise PeerWireError("malformed", "bad embeddings request: timeout_s is not seconds")
    return EmbedRequest(model, tuple(_embed_input(i) for i in inputs), timeout_s)


def _embed_input(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return tuple(value)
    raise PeerWireError("malformed", "bad embeddings request: an input is neither text nor tokens")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seconds(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and 0 < value < float("inf")


def embed_result_to_wire(result: EmbedResult) -> dict[str, Any]:
    """Return the result as a map (what dataclasses.asdict gives)."""
    return {
        "vectors": result.vectors,
        "prompt_tokens": result.prompt_tokens,
        "latency_ms": result.latency_ms,
        "model_version": result.model_version,
    }


def embed_result_from_wire(body: Any) -> EmbedResult:
    """Rebuild an EmbedResult from a peer's answer; PeerWireError if it does not fit."""
    if not isinstance(body, dict):
        raise PeerWireError("malformed", "bad embeddings result: not a map")
    vectors, tokens = body.get("vectors"), body.get("prompt_tokens")
    latency, version = body.get("latency_ms"), body.get("model_version")
    if not (
        isinstance(vectors, list)
        and all(isinstance(v, bytes) for v in vectors)
        and isinstance(tokens, int)
        and isinstance(latency, int | float)
        and not isinstance(tokens, bool)
        and not isinstance(latency, bool)
        and isinstance(version, str)
    ):
        raise PeerWireError("malformed", "bad embeddings result: a field is missing or mistyped")
    return EmbedResult(tuple(vectors), tokens, float(latency), version)


def load_to_wire(req: LoadRequest) -> dict[str, Any]:
    return dataclasses.asdict(req)


def load_from_wire(body: Any) -> LoadRequest:
    try:
        return LoadRequest(**body)
    except TypeError as exc:
        raise PeerWireError("malformed", f"bad load request: {exc}") from None


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, MocError):
        return {
            "code": exc.code,
            "message": str(exc),
            "retry_after": getattr(exc, "retry_after", None),
            "field": getattr(exc, "field", None),
        }
    return {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


def _codes() -> dict[str, type[MocError]]:
    table: dict[str, type[MocError]] = {}
    stack: list[type[MocError]] = [MocError]
    while stack:
        cls = stack.pop()
        table.setdefault(cls.code, cls)
        stack.extend(cls.__subclasses__())
    return table


def error_from_wire(body: Any) -> MocError:
    """Rebuild the peer's error as the same domain error class (by its code)."""
    if not isinstance(body, dict):
        return MocError("the peer sent a malformed error")
    code = str(body.get("code", "internal_error"))
    message = str(body.get("message", code))
    cls = _codes().get(code, MocError)
    if issubclass(cls, domain_errors.InvalidRequest):
        return cls(str(body.get("field") or "request"), message.partition(": ")[2] or message)
    if issubclass(cls, domain_errors.Overloaded):
        return cls(message, retry_after=float(body.get("retry_after") or 1.0))
    try:
        return cls(message)
    except TypeError:
        return MocError(message)
