"""The frames of bench/fuzz.py, built without any I/O: seeded, so any frame can be built again.

Issue 13's cases as seeds (lone surrogates, 5,000-deep nesting, msgpack length claims, 2^63
values, 5,000-character paths and names, duplicate JSON keys, huge n_ctx, NUL bytes), a value-wise
JSON mutator, and the frames of each port that needs no live packets: ZeroMQ legacy messages, raw
HTTP requests (chunked junk included), and ZMTP bytes before and after a handshake. The byte-wise
mutator and the live tests' own streams are reused from tests/fuzz.
"""

from __future__ import annotations

import copy
import json
import random
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgpack  # noqa: E402

from tests.fuzz.test_live_frames import (  # noqa: E402
    bad_exchange,
    bad_zmq_message,
    encode,
    http_request,
    legacy,
)
from tests.integration.live_cluster import mutate  # noqa: E402
from transports.peer_wire import MAX_FRAME_BYTES  # noqa: E402
from transports.zmtp import command, encode_message, greeting, ready  # noqa: E402

MODEL = "m"
"""The catalog model of tests/moc_node/cluster_procs.py."""
PEER_BATCH = 20
"""Most envelope messages on one peer connection (a barrier PING follows them)."""


def frame_rng(seed: int, port: str, index: int) -> random.Random:
    """Return the RNG of one frame: any frame can be built again from (seed, port, index)."""
    return random.Random(f"{seed}:{port}:{index}")


# ---- issue 13 cases and value mutation (pure) ---------------------------------------------

DEPTH = 5000
DEEP_JSON = "[" * DEPTH + "]" * DEPTH
DEEP_MSGPACK = b"\x91" * DEPTH + b"\xc0"  # fixarray(1) nested 5,000 deep around nil
LONG = 5000
U63 = 2**63
MISSING = "fuzz-missing.gguf"
"""A load in the stream names this file, which does not exist: refused before any worker starts."""

INFER_M = {"model_name": MODEL, "input_text": "hi", "max_tokens": 1}
COMPLETION_M = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
CHAT_M = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@dataclass(frozen=True, slots=True)
class Seed:
    """One issue 13 case: a ZMQ action or HTTP route, and its payload as JSON text (the text
    can hold what a dict cannot: duplicate keys, 5,000-deep nesting)."""

    case: str
    action: str | None
    route: str | None
    payload: str


def _j(obj: Any) -> str:
    return json.dumps(obj)  # ensure_ascii: a lone surrogate goes out as a valid \\udXXX escape


SEEDS: tuple[Seed, ...] = (
    Seed("surrogate_prompt", "infer", "/inference", _j({**INFER_M, "input_text": "a\ud800b"})),
    Seed("surrogate_stop", "infer", "/inference", _j({**INFER_M, "stop_sequences": ["\udc00"]})),
    Seed("surrogate_name", "infer", "/inference", _j({**INFER_M, "model_name": "m\ud800"})),
    Seed("surrogate_load", "load_model", "/models",
         _j({"model_name": "sur\ud800x", "model_path": MISSING})),
    Seed("surrogate_openai_prompt", None, "/v1/completions", _j({**COMPLETION_M, "prompt": "\ud800"})),
    Seed("surrogate_openai_stop", None, "/v1/completions", _j({**COMPLETION_M, "stop": ["\udfff"]})),
    Seed("surrogate_chat", None, "/v1/chat/completions",
         _j({**CHAT_M, "messages": [{"role": "user", "content": "x\udbff"}]})),
    Seed("deep_prompt", "infer", "/inference",
         f'{{"model_name": "m", "input_text": {DEEP_JSON}, "max_tokens": 1}}'),
    Seed("deep_body", "infer", "/v1/completions", DEEP_JSON),
    Seed("deep_stop", None, "/v1/completions",
         f'{{"model": "m", "prompt": "hi", "max_tokens": 1, "stop": {DEEP_JSON}}}'),
    Seed("u63_max_tokens", "infer", "/inference", _j({**INFER_M, "max_tokens": U63})),
    Seed("u63_n_ctx", "load_model", "/models", _j({"model_name": MODEL, "n_ctx": U63})),
    Seed("huge_n_ctx", "load_model", "/models", _j({"model_name": MODEL, "n_ctx": 1 << 20})),
    Seed("huge_n_ctx_new", "load_model", "/models",
         _j({"model_name": "fuzz-ctx", "model_path": MISSING, "n_ctx": 1 << 20})),
    Seed("long_path", "load_model", "/models", _j({"model_name": "long", "model_path": "x" * LONG})),
    Seed("long_name", "infer", "/inference", _j({**INFER_M, "model_name": "n" * LONG})),
    Seed("long_load_name", "load_model", "/models",
         _j({"model_name": "n" * LONG, "model_path": MISSING})),
    Seed("nul_name", "infer", "/inference", _j({**INFER_M, "model_name": "m\x00"})),
    Seed("nul_load", "load_model", "/models", _j({"model_name": "nul\x00x", "model_path": MISSING})),
    Seed("nul_path", "load_model", "/models", _j({"model_name": "nulpath", "model_path": "m.gguf\x00"})),
    Seed("nul_openai", None, "/v1/completions", _j({**COMPLETION_M, "model": "\x00"})),
    # The last key wins in Python's json: either way the answer is harmless (health or a 409).
    Seed("duplicate_keys", "health", None,
         '{"action": "health", "payload": {}, "action": "load_model", '
         '"payload": {"model_name": "m"}, "request_id": "dup"}'),
    Seed("duplicate_body_keys", "infer", "/inference",
         '{"model_name": "m", "input_text": "hi", "max_tokens": 1, "model_name": "zz", '
         '"max_tokens": 2049}'),
    Seed("duplicate_openai_keys", None, "/v1/completions",
         '{"model": "m", "prompt": "hi", "max_tokens": 1, "model": "\\u0000", "prompt": 5}'),
)  # fmt: skip
"""A seed with `action` None is HTTP only; with `route` None ZMQ only. `duplicate_keys` is a whole
ZMQ request (its payload text is sent as the frame)."""

LONG_PATHS = ("/v1/models/" + "x" * LONG, "/models/" + "y" * LONG, "/learning/jobs/" + "z" * LONG,
              "/goals/" + "g" * LONG, "/" + "p" * LONG, "/v1/models/" + "%ed%a0%80" * 50,
              "/v1/models/m%00", "/models/%00")  # fmt: skip
"""GET targets: 5,000-character paths, encoded lone surrogates and NULs."""

MSGPACK_CLAIMS: tuple[tuple[str, bytes], ...] = (
    ("array32_claim", b"\xdd\xff\xff\xff\xff\xc0"),
    ("map32_claim", b"\xdf\xff\xff\xff\xff\xa1a\xc0"),
    ("str32_claim", b"\xdb\xff\xff\xff\xffabc"),
    ("bin32_claim", b"\xc6\xff\xff\xff\xffabc"),
    ("ext32_claim", b"\xc9\xff\xff\xff\xff\x01abc"),
    ("deep", DEEP_MSGPACK),
)
"""msgpack values that claim 2^32-1 items or bytes with a few behind them, and 5,000-deep nesting."""

INTERESTING: tuple[Any, ...] = (
    0, -1, 1, 2049, 2**31, U63, -U63, 2**64, 1e308, -0.0, 0.5, float("inf"), "", " ", "\ud800",
    "\udc00x", "m\x00", "x" * LONG, None, True, False, [], {}, [None], {"": None}, ["\ud800"] * 11,
    [[[[]]]], MODEL,
)  # fmt: skip


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Collect (container, key) for every value inside dicts and lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            _slots(v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            _slots(v, out)
    return out


def mutate_value(rng: random.Random, obj: Any) -> Any:
    """Return a copy of a JSON-like object with one value replaced, removed, or a key added."""
    new = copy.deepcopy(obj)
    slots = _slots(new, [])
    if not slots:
        return rng.choice(INTERESTING)
    container, key = rng.choice(slots)
    kind = rng.choice(["replace", "replace", "replace", "remove", "add"])
    if kind == "replace":
        container[key] = rng.choice(INTERESTING)
    elif kind == "remove":
        del container[key]
    elif isinstance(container, dict):
        container[rng.choice(["extra", "model_name", "n_ctx", "\ud800", "", "action"])] = rng.choice(
            INTERESTING
        )
    else:
        container.insert(key, rng.choice(INTERESTING))
    return new


_MSGPACK = msgpack.Packer(use_bin_type=True, unicode_errors="surrogatepass")


def pack(obj: Any) -> bytes:
    """msgpack a value as a careless client would: lone surrogates as their 3 UTF-8-ish bytes."""
    try:
        return bytes(_MSGPACK.pack(obj))
    except (OverflowError, ValueError, TypeError):
        return bytes(_MSGPACK.pack(repr(obj)))  # an int past 2^64: the text instead


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity go out as JSON's non-standard words


def _zmq_seed_bodies() -> list[tuple[str, bytes]]:
    """Every ZMQ seed as (case, frame body), JSON and msgpack."""
    out: list[tuple[str, bytes]] = []
    for s in SEEDS:
        if s.action is None:
            continue
        if s.route is None:
            out.append((s.case, s.payload.encode()))
            continue
        text = f'{{"action": "{s.action}", "payload": {s.payload}, "request_id": "{s.case}"}}'
        out.append((s.case, text.encode()))
        try:
            payload = json.loads(s.payload)
        except RecursionError:
            payload = None  # the deep cases: msgpack gets its own deep value below
        if payload is not None:
            out.append((s.case + "_msgpack", pack(legacy(s.action, payload, s.case))))
    head = b"\x84" + pack("action") + pack("infer") + pack("request_id") + pack("claim")
    head += pack("timestamp") + pack("2024-05-01T12:00:00Z") + pack("payload")
    for case, value in MSGPACK_CLAIMS:
        out.append((case, head + value))  # the payload itself claims the length
        inner = b"\x83" + pack("model_name") + pack(MODEL) + pack("max_tokens") + pack(1)
        out.append((case + "_prompt", head + inner + pack("input_text") + value))
    return out


ZMQ_SEEDS = _zmq_seed_bodies()
ZMQ_VALID: list[tuple[str, dict[str, Any]]] = [
    ("infer", INFER_M),
    ("infer", {**INFER_M, "temperature": 0.0, "stop_sequences": ["\n"]}),
    ("load_model", {"model_name": MODEL, "model_path": MISSING}),
    ("load_model", {"model_name": MODEL}),  # already loaded: a 409, never a new worker
    ("health", {}),
    ("list_models", {}),
    ("get_job", {"job_id": "nope"}),
]


def zmq_frame(rng: random.Random, index: int) -> list[bytes]:
    """Return the frames of one ZMQ message: the live test's stream, or a seed, mutated or not."""
    roll = rng.random()
    if roll < 0.4:
        return bad_zmq_message(rng, index)
    if roll < 0.7:
        case, body = rng.choice(ZMQ_SEEDS)
        body = body if rng.random() < 0.3 else mutate(rng, body)
    else:
        action, payload = rng.choice(ZMQ_VALID)
        message = legacy(action, payload, f"v-{index}")
        if rng.random() < 0.5:
            message = mutate_value(rng, message)
            body = dumps(message) if rng.random() < 0.5 else pack(message)
        else:
            body = mutate(rng, encode(message, rng.choice(["json", "msgpack"])))
    if rng.random() < 0.1:  # multipart junk after a real body
        return [b"", body, *(rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3)))]
    return [b"", body]


HTTP_VALID: list[tuple[str, dict[str, Any]]] = [
    ("/inference", INFER_M),
    ("/v1/completions", COMPLETION_M),
    ("/v1/chat/completions", CHAT_M),
    ("/models", {"model_name": MODEL, "model_path": MISSING}),
]


def chunked_junk(rng: random.Random) -> bytes:
    """Return a POST with a chunked body that is broken, hostile, or (rarely) fine."""
    route, valid = rng.choice(HTTP_VALID)
    body = dumps(valid)
    half = len(body) // 2
    te = rng.choice(["chunked", "chunked", "Chunked", "chunked, identity", "xchunked", "chunked\x00"])
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nTransfer-Encoding: {te}\r\n"
    )
    if rng.random() < 0.2:  # smuggling shape: both framings
        head += f"Content-Length: {rng.choice([0, 5, len(body)])}\r\n"
    good = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
    kind = rng.choice(["good", "bad_size", "huge_size", "negative", "no_end", "extension",
                       "mismatch", "trailer", "mutated", "random"])  # fmt: skip
    chunks = {
        "good": good,
        "bad_size": b"zz\r\n" + body + b"\r\n0\r\n\r\n",
        "huge_size": b"ffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n",
        "negative": b"-1\r\n" + body + b"\r\n0\r\n\r\n",
        "no_end": good[: -len(b"0\r\n\r\n")],
        "extension": b"%x;%s\r\n%s\r\n0\r\n\r\n" % (len(body), b"a" * rng.choice([10, 5000]), body),
        "mismatch": b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) + rng.randint(1, 50), body),
        "trailer": good[:-2] + b"X-T: " + b"t" * rng.choice([10, 9000]) + b"\r\n\r\n",
        "mutated": mutate(rng, good),
        "random": rng.randbytes(rng.randint(1, 300)),
    }[kind]
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + chunks


def http_frame(rng: random.Random) -> bytes:
    """Return one raw HTTP request: the live test's stream, a seed, or a mutated valid one."""
    roll = rng.random()
    if roll < 0.3:
        return bad_exchange(rng).raw
    if roll < 0.5:
        seeds = [s for s in SEEDS if s.route is not None]
        s = rng.choice(seeds)
        body = s.payload.encode() if rng.random() < 0.4 else mutate(rng, s.payload.encode())
        return http_request("POST", s.route or "/", body)
    if roll < 0.6:
        return http_request(rng.choice(["GET", "DELETE", "POST"]), rng.choice(LONG_PATHS))
    if roll < 0.7:
        return chunked_junk(rng)
    route, valid = rng.choice(HTTP_VALID)
    if roll < 0.85:  # a valid request whose JSON body is mutated value-wise
        return http_request("POST", route, dumps(mutate_value(rng, valid)))
    # A valid request whose request line or headers are mutated, body left alone.
    raw = http_request("POST", route, dumps(valid))
    head, sep, body = raw.partition(b"\r\n\r\n")
    return mutate(rng, head) + sep + body


def show(seed: int, spec: str) -> bytes:
    """Return frame INDEX of PORT (zmq or http only: the others need live packets)."""
    port, _, index = spec.partition(":")
    rng = frame_rng(seed, port, int(index))
    if port == "zmq":
        return repr(zmq_frame(rng, int(index))).encode()
    if port == "http":
        return http_frame(rng)
    raise SystemExit(f"--show takes zmq:N or http:N, not {spec!r}")


# ---- ZMTP frames for the peer port (pure) ---------------------------------------------------

_U64 = struct.Struct(">Q")


def zmtp_raw(rng: random.Random) -> bytes:
    """Return what a fresh connection sends before (or instead of) a proper handshake."""
    hello = greeting(as_server=False) + ready("DEALER")
    kind = rng.choice(["random", "random", "mutated", "mutated", "version", "mechanism",
                       "no_type", "cut_property", "huge_property", "pub", "ff"])  # fmt: skip
    if kind == "random":
        return rng.randbytes(rng.randint(1, 300))
    if kind == "mutated":
        return mutate(rng, hello)
    if kind == "version":
        return hello[:10] + bytes([rng.choice([0, 1, 2]), 0]) + hello[12:]
    if kind == "mechanism":
        mech = rng.choice([b"CURVE", b"PLAIN", b"\xff" * 20, b""]).ljust(20, b"\x00")
        return hello[:12] + mech + hello[32:]
    if kind == "no_type":
        return greeting(as_server=False) + command(b"READY", b"")
    if kind == "cut_property":
        return greeting(as_server=False) + command(b"READY", b"\x0bSocket-Type\x00\x00")
    if kind == "huge_property":
        return greeting(as_server=False) + command(b"READY", b"\x0bSocket-Type\xff\xff\xff\xff")
    if kind == "pub":
        return greeting(as_server=False) + ready("PUB")
    return b"\xff" + b"\x00" * 8  # a greeting cut before its version: the node waits, then times out


def zmtp_framing(rng: random.Random, frames: list[bytes]) -> bytes:
    """Return a message (after the handshake) whose ZMTP framing is broken."""
    kind = rng.choice(["mutated", "mutated", "flags", "u63", "over_limit", "ping_no_ttl", "ready2",
                       "error", "unknown_cmd", "empty_cmd", "many_frames", "more_then_eof"])  # fmt: skip
    if kind == "mutated":
        return mutate(rng, encode_message(frames))
    if kind == "flags":
        return bytes([rng.choice([0x08, 0x10, 0x80, 0xFF])]) + b"\x01x"
    if kind == "u63":
        return b"\x02" + _U64.pack(U63) + b"x"
    if kind == "over_limit":
        return b"\x02" + _U64.pack(MAX_FRAME_BYTES + 1) + b"x" * 64
    if kind == "ping_no_ttl":
        return command(b"PING", b"")
    if kind == "ready2":
        return ready("DEALER")
    if kind == "error":
        return command(b"ERROR", b"\x04oops")
    if kind == "unknown_cmd":
        return command(b"X" * rng.randint(1, 200), rng.randbytes(rng.randint(0, 50)))
    if kind == "empty_cmd":
        return rng.choice([b"\x04\x00", b"\x04\x01\x05"])
    if kind == "many_frames":
        return encode_message([b"f"] * 17)
    return b"\x01\x05hello"  # MORE, then the connection ends


def peer_plan(rng: random.Random) -> tuple[int, bool]:
    """Return what one peer connection sends: envelope messages after a handshake (0: raw bytes
    instead) and whether a broken ZMTP frame ends it. It takes messages + framing indices."""
    if rng.random() < 0.3:
        return 0, False
    return rng.randint(1, PEER_BATCH), rng.random() < 0.5


def connection_starts(seed: int, start: int, count: int) -> Iterator[int]:
    """Yield the first frame index of each peer connection until `count` frames are planned."""
    index = start
    while index < start + count:
        yield index
        messages, framing = peer_plan(frame_rng(seed, "peer", index))
        index += max(1, messages + framing)
