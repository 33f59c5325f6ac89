"""The legacy ZeroMQ wire format, as pure functions over bytes and decoded objects.

One frame per request, JSON when it starts with `{`, otherwise msgpack; the reply
`{"success", "result", "error", "request_id", "latency_ms"}` goes back in the request's encoding.
No socket here: `transports.zmq_legacy` moves the frames, and the fuzz tests drive these
functions directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

from actors.errors import InvalidRequest
from actors.names import text_problem
from transports.auth import KeyRing
from transports.dispatch import ACTIONS, Action, lookup_action
from transports.errors import BadFrame, ErrorReply, Unauthorized

__all__ = [
    "KEY_FIELD",
    "NO_ACTION",
    "OPEN_ACTIONS",
    "UNKNOWN_ACTION",
    "action_label",
    "check_key",
    "decode_frame",
    "DuplicateKey",
    "echo_id",
    "encode_reply",
    "Encoding",
    "error_reply",
    "guess_encoding",
    "parse_request",
    "Request",
    "split_envelope",
    "success_reply",
]

Encoding = Literal["json", "msgpack"]

# First bytes of a msgpack map (fixmap, map16, map32): such frames skip the JSON attempt.
_MSGPACK_MAP_HEADS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
# Label for frames too broken to name an action.
NO_ACTION = "none"
UNKNOWN_ACTION = "unknown"
KEY_FIELD = "api_key"
"""The request field that carries an API key, beside action and payload."""
OPEN_ACTIONS = frozenset({"health"})
"""Answered without a key even under zmq_require_api_key (details left out, as on HTTP)."""


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split ROUTER frames into the routing envelope (kept for the reply) and the body frames.

    A REQ peer's envelope ends with an empty delimiter frame; a DEALER peer may send none, and then
    the envelope is just its identity.
    """
    for i in range(1, len(frames)):
        if not frames[i]:
            return frames[: i + 1], frames[i + 1 :]
    return frames[:1], frames[1:]


def guess_encoding(body: bytes) -> Encoding:
    """Pick the reply encoding for a frame that may not decode at all."""
    head = body.lstrip()[:1]
    if head == b"{" or not head:
        return "json"
    return "msgpack" if head[0] >= 0x80 else "json"


class DuplicateKey(BadFrame):
    """A map in the frame names one key twice (which one would win is the decoder's whim)."""


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                shown = repr(key) if isinstance(key, str) and len(key) <= 64 else "a key"
                raise DuplicateKey(f"frame names {shown} twice in one map")
            seen.add(key)
    return mapping


def decode_frame(body: bytes) -> tuple[Encoding, Any]:
    """Decode one request frame; raise BadFrame when it is neither JSON nor msgpack, or when a
    map in it repeats a key (a second `action` must not override the first)."""
    head = body[:1]
    if head and head[0] in _MSGPACK_MAP_HEADS:
        return "msgpack", _unpack(body)
    try:
        return "json", json.loads(body, object_pairs_hook=_unique_map)
    except DuplicateKey:
        raise
    except (ValueError, RecursionError):
        if head == b"{":
            raise BadFrame("frame starts with '{' but is not valid JSON") from None
    try:
        return "msgpack", _unpack(body)
    except DuplicateKey:
        raise
    except BadFrame:
        raise BadFrame("frame is neither JSON nor msgpack") from None


def _unpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(
            body, raw=False, strict_map_key=True, object_pairs_hook=_unique_map
        )
    except DuplicateKey:
        raise
    except Exception:  # msgpack raises many unrelated types (ExtraData, ValueError, TypeError...)
        raise BadFrame("frame is not valid msgpack") from None


# One encoder for every reply: json.dumps with options builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode_reply(reply: Mapping[str, Any], encoding: Encoding) -> bytes:
    """Encode a reply; raise TypeError or ValueError when a value cannot be encoded."""
    if encoding == "json":
        return _JSON.encode(reply).encode("utf-8")
    packed: bytes = msgpack.packb(reply, use_bin_type=True)
    return packed


def echo_id(value: Any, encoding: Encoding) -> Any:
    """Return the request_id to echo: the client's own when the reply encoding can carry it."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, bytes) and encoding == "msgpack":
        return value
    return None


def success_reply(result: Any, request_id: Any, latency_ms: float) -> dict[str, Any]:
    """Build the legacy reply for a success."""
    return {
        "success": True,
        "result": result,
        "error": None,
        "request_id": request_id,
        "latency_ms": latency_ms,
    }


def error_reply(err: ErrorReply, request_id: Any, latency_ms: float) -> dict[str, Any]:
    """Build the legacy reply for a failure; `error_code` and `retry_after` are additions."""
    overloaded = err.retry_after is not None and err.status == 503 and err.code != "shutting_down"
    reply: dict[str, Any] = {
        "success": False,
        "result": None,
        # Legacy clients match the literal "overloaded" (issue 3); the detail goes alongside.
        "error": "overloaded" if overloaded else err.message,
        "request_id": request_id,
        "latency_ms": latency_ms,
        "error_code": err.code,
        "detail": err.message,
    }
    if err.field is not None:
        reply["field"] = err.field
    if err.retry_after is not None:
        reply["retry_after"] = err.retry_after
    return reply


@dataclass(frozen=True, slots=True)
class Request:
    """One decoded request, ready for the table."""

    action: Action
    payload: Mapping[str, Any]
    request_id: Any


def parse_request(obj: Any, encoding: Encoding) -> tuple[Any, Request | BaseException]:
    """Return the request_id to echo and either the request or the error to answer with."""
    if not isinstance(obj, dict):
        return None, InvalidRequest("request", "expected an object")
    request_id = echo_id(obj.get("request_id"), encoding)
    if isinstance(request_id, str) and (problem := text_problem(request_id)) is not None:
        # Refused before any work: the reply could not carry it back (a lone surrogate).
        return None, InvalidRequest("request_id", problem)
    name = obj.get("action")
    try:
        action = lookup_action(name)
    except Exception as exc:
        return request_id, exc
    payload = obj.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        return request_id, InvalidRequest("payload", "expected an object")
    return request_id, Request(action, payload, request_id)


def action_label(obj: Any) -> str:
    """Name the action for metrics without letting a client invent label values."""
    if not isinstance(obj, dict):
        return NO_ACTION
    name = obj.get("action")
    if isinstance(name, str) and name in ACTIONS:
        return name
    return UNKNOWN_ACTION if name is not None else NO_ACTION


def check_key(
    obj: Any, keys: KeyRing, require: bool
) -> tuple[bool, Unauthorized | None]:
    """Check the request's `api_key`: return whether it presented a good key, and the refusal
    to answer with (None to go on). A wrong key is refused always; a missing one when `require`
    (except the open actions). Without configured keys every request goes on."""
    if not keys:
        return True, None
    presented = obj.get(KEY_FIELD) if isinstance(obj, dict) else None
    if presented is not None:
        if isinstance(presented, str) and keys.matches(presented):
            return True, None
        return False, Unauthorized("unauthorized: invalid API key")
    if require and not (isinstance(obj, dict) and obj.get("action") in OPEN_ACTIONS):
        return False, Unauthorized(
            f"unauthorized: missing API key (send it in the request's {KEY_FIELD!r})"
        )
    return False, None
