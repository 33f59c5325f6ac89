"""The pure frame builders of bench/fuzz.py: reproducible, true to the issue 13 cases they name,
and never a load that would start a worker."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fuzz_frames as ff  # noqa: E402

from transports.zmtp import Decoder, ZmtpError, greeting, ready  # noqa: E402

SEED = 7


def test_a_frame_is_built_again_from_its_seed_port_and_index() -> None:
    for index in range(50):
        assert ff.http_frame(ff.frame_rng(SEED, "http", index)) == ff.http_frame(
            ff.frame_rng(SEED, "http", index)
        )
        assert ff.zmq_frame(ff.frame_rng(SEED, "zmq", index), index) == ff.zmq_frame(
            ff.frame_rng(SEED, "zmq", index), index
        )
    assert len({ff.http_frame(ff.frame_rng(SEED, "http", i)) for i in range(50)}) > 45


def _pairs(text: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found.extend(pairs)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


SEEDS = {s.case: s for s in ff.SEEDS}


@pytest.mark.parametrize("case", [c for c in SEEDS if c.startswith("surrogate")])
def test_the_surrogate_seeds_carry_a_lone_surrogate_as_valid_json(case: str) -> None:
    text = SEEDS[case].payload
    text.encode("ascii")  # escaped: the frame itself is valid UTF-8
    assert any(
        any(0xD800 <= ord(ch) <= 0xDFFF for ch in s) for s in _strings(json.loads(text))
    )


def test_the_other_seeds_are_what_their_names_say() -> None:
    for case in ("deep_prompt", "deep_body", "deep_stop"):
        assert SEEDS[case].payload.count("[") == ff.DEPTH
    keys = [k for k, _ in _pairs(SEEDS["duplicate_keys"].payload)]
    assert keys.count("action") == 2 and keys.count("payload") == 2
    assert json.loads(SEEDS["u63_max_tokens"].payload)["max_tokens"] == 2**63
    assert json.loads(SEEDS["huge_n_ctx"].payload)["n_ctx"] == 1 << 20
    assert len(json.loads(SEEDS["long_path"].payload)["model_path"]) == ff.LONG
    assert "\x00" in json.loads(SEEDS["nul_load"].payload)["model_name"]
    for case, value in ff.MSGPACK_CLAIMS:
        with pytest.raises(Exception):  # noqa: B017 - msgpack raises several unrelated types
            msgpack.unpackb(value, raw=False)
        if case != "deep":
            assert value[1:5] == b"\xff\xff\xff\xff", case  # a 2^32-1 length claim


def test_mutate_value_leaves_its_input_alone_and_changes_one_thing() -> None:
    rng = random.Random(SEED)
    original = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    kept = json.dumps(original)
    changed = 0
    for _ in range(200):
        changed += ff.mutate_value(rng, original) != original
        assert json.dumps(original) == kept
    assert changed > 150  # a replacement may put back an equal value, rarely


def _model_paths(body: bytes) -> list[str]:
    try:
        obj = json.loads(body) if body[:1] == b"{" else msgpack.unpackb(body, raw=False)
    except Exception:  # not decodable: no load at all
        return []
    if not isinstance(obj, dict):
        return []
    found = [obj.get("model_path")]
    if isinstance(obj.get("payload"), dict):
        found.append(obj["payload"].get("model_path"))
    return [p for p in found if isinstance(p, str)]


def test_no_load_in_the_stream_names_the_real_model_file() -> None:
    paths: list[str] = []
    for index in range(3000):
        for body in ff.zmq_frame(ff.frame_rng(SEED, "zmq", index), index):
            paths += _model_paths(body)
        paths += _model_paths(ff.http_frame(ff.frame_rng(SEED, "http", index)).partition(
            b"\r\n\r\n")[2])
    assert paths, "the stream holds loads"
    assert not [p for p in paths if Path(p).name == "m.gguf"]


def test_the_zmtp_framing_frames_are_refused_by_the_zmtp_decoder_after_a_handshake() -> None:
    rng = random.Random(SEED)
    refused = 0
    for _ in range(300):
        decoder = Decoder(max_frame_bytes=ff.MAX_FRAME_BYTES)
        decoder.feed(greeting(as_server=False) + ready("DEALER"))
        try:
            decoder.feed(ff.zmtp_framing(rng, [b"payload", b"tag"]))
        except ZmtpError:
            refused += 1
    assert refused > 150


def test_the_peer_connections_plan_exactly_the_frames_asked_for() -> None:
    starts = list(ff.connection_starts(SEED, 200, 1000))
    assert starts[0] == 200
    for a, b in zip(starts, starts[1:], strict=False):
        messages, framing = ff.peer_plan(ff.frame_rng(SEED, "peer", a))
        assert b - a == max(1, messages + framing)
    assert starts[-1] < 1200
