"""Node metadata: round trip, size limit and predictable truncation, refusal of garbage, and
the publish rule."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from cluster.errors import LocalUsageError
from cluster.meta import (
    MAX_META_BYTES,
    BadMeta,
    DeviceMeta,
    ModelMeta,
    NodeMeta,
    decode_meta,
    encode_meta,
    fit_meta,
    should_publish,
)

FULL = NodeMeta(
    devices=(DeviceMeta("cuda:0", 24576, 12000, 11000), DeviceMeta("cpu", 64000, 30000, 2000)),
    loaded=(ModelMeta("llama-3-8b-q4", 3), ModelMeta("phi-3-mini", 0)),
    loading=("mistral-7b",),
    zmq="10.0.0.5:7211",
    http="10.0.0.5:8008",
    peer="10.0.0.5:7213",
    generation=7,
    leaving=True,
    primary_term=4,
)


def test_a_full_metadata_round_trips_within_512_bytes() -> None:
    data = encode_meta(FULL)
    assert len(data) <= MAX_META_BYTES
    assert decode_meta(data) == FULL
    assert FULL.queue_depth == 3
    assert FULL.queue_of("phi-3-mini") == 0
    assert FULL.queue_of("absent") is None


def test_an_empty_metadata_round_trips() -> None:
    assert decode_meta(encode_meta(NodeMeta())) == NodeMeta()


def test_too_many_models_drop_loading_first_then_loaded_from_the_end_and_say_so() -> None:
    many = dataclasses.replace(
        FULL,
        loaded=tuple(ModelMeta(f"model-{i:03d}-with-a-long-name", i) for i in range(30)),
        loading=tuple(f"loading-{i:03d}-with-a-long-name" for i in range(10)),
    )
    data = encode_meta(many)
    assert len(data) <= MAX_META_BYTES
    got = decode_meta(data)
    assert got.truncated
    assert got.loading == ()
    assert got.loaded == many.loaded[: len(got.loaded)]
    assert 0 < len(got.loaded) < 30
    assert got.devices == FULL.devices
    assert fit_meta(many) == got  # the same input always degrades the same way


def test_addresses_too_long_to_ever_fit_are_refused_locally() -> None:
    with pytest.raises(LocalUsageError, match="empty lists"):
        encode_meta(NodeMeta(zmq="x" * 600))


def test_negative_figures_are_refused_locally() -> None:
    with pytest.raises(LocalUsageError, match="cuda:0"):
        encode_meta(NodeMeta(devices=(DeviceMeta("cuda:0", 10, -1, 0),)))


def _packed(raw: object) -> bytes:
    return bytes(msgpack.packb(raw, use_bin_type=True))


GOOD = [1, [["d", 1, 1, 0]], [["m", 0]], [], ["", "", ""], 0, 0, 0]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1\xff", "msgpack"),
        (_packed({"a": 1}), "array"),
        (_packed([2, *GOOD[1:]]), "version 2"),
        (_packed([1, [["d", 1, -5, 0]], *GOOD[2:]]), "free_mb"),
        (_packed([1, [["d", 1, 1]], *GOOD[2:]]), "device"),
        (_packed([*GOOD[:2], [["m", "x"]], *GOOD[3:]]), "queue"),
        (_packed([*GOOD[:4], ["", ""], *GOOD[5:]]), "addresses"),
        (b"\x91" + b"\x00" * 600, "bytes"),
    ],
    ids=[
        "garbage",
        "map",
        "newer-version",
        "negative",
        "short-device",
        "bad-queue",
        "two-addresses",
        "oversized",
    ],
)
def test_garbage_metadata_is_refused_naming_the_field(data: bytes, match: str) -> None:
    with pytest.raises(BadMeta, match=match):
        decode_meta(data)


def test_trailing_fields_from_a_newer_minor_layout_are_ignored() -> None:
    assert decode_meta(_packed([*GOOD, "future"])).devices == (DeviceMeta("d", 1, 1, 0),)


BASE = NodeMeta(devices=(DeviceMeta("cuda:0", 1000, 500, 400),), loaded=(ModelMeta("a", 0),))


def _dev(free: int, claimed: int = 400) -> tuple[DeviceMeta, ...]:
    return (DeviceMeta("cuda:0", 1000, free, claimed),)


@pytest.mark.parametrize(
    ("new", "since", "expected"),
    [
        (BASE, 10.0, False),
        (dataclasses.replace(BASE, loaded=(ModelMeta("b"),)), 0.6, True),
        (dataclasses.replace(BASE, loaded=(ModelMeta("b"),)), 0.4, False),
        (dataclasses.replace(BASE, loading=("b",)), 0.6, True),
        (dataclasses.replace(BASE, devices=_dev(450)), 0.6, True),
        (dataclasses.replace(BASE, devices=_dev(451)), 0.6, False),
        (dataclasses.replace(BASE, devices=_dev(451)), 5.0, True),
        (dataclasses.replace(BASE, loaded=(ModelMeta("a", 9),)), 1.0, False),
        (dataclasses.replace(BASE, loaded=(ModelMeta("a", 9),)), 5.0, True),
        (dataclasses.replace(BASE, primary_term=3), 0.5, True),
        (dataclasses.replace(BASE, leaving=True), 0.5, True),
        (dataclasses.replace(BASE, devices=()), 0.5, True),
    ],
    ids=[
        "unchanged",
        "model-set-changed",
        "model-set-changed-too-soon",
        "loading-started",
        "free-moved-5pct",
        "free-moved-4.9pct",
        "small-move-after-refresh",
        "queue-only",
        "queue-after-refresh",
        "became-primary",
        "leaving",
        "device-gone",
    ],
)
def test_publish_rule(new: NodeMeta, since: float, expected: bool) -> None:
    assert should_publish(BASE, new, 100.0, 100.0 + since) is expected


def test_the_first_metadata_is_always_published() -> None:
    assert should_publish(None, BASE, None, 0.0)
