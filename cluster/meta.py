"""Node metadata gossiped with membership: what a node holds and how busy it is.

The metadata rides inside every `Alive` message, so it is small (<= 512 bytes encoded) and
versioned: a msgpack array `[version, devices, loaded, loading, [zmq, http, peer], generation,
flags, primary_term]`. Fields are only ever appended; a decoder ignores trailing fields it does
not know, and refuses another major `version`.

When the encoding would exceed the limit it degrades predictably instead of failing: entries are
dropped from the end of `loading`, then of `loaded`, then of `devices`, and `truncated` is set, so
a reader knows the lists are partial.

`should_publish` is the pure rate rule: gossip a new version when the model set changes or a
device's free memory moves by >= 5% of its total, at most every 0.5 s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

from cluster.errors import LocalUsageError, PeerProtocolError

__all__ = [
    "FREE_MEMORY_STEP",
    "MAX_META_BYTES",
    "META_VERSION",
    "MIN_PUBLISH_INTERVAL_S",
    "REFRESH_S",
    "BadMeta",
    "decode_meta",
    "DeviceMeta",
    "encode_meta",
    "fit_meta",
    "ModelMeta",
    "NodeMeta",
    "should_publish",
]

META_VERSION = 1
"""Major version of the metadata layout; a different one is refused (fields are appended)."""

MAX_META_BYTES = 512
"""Encoded size limit, as memberlist's meta limit: an Alive with it still fits one datagram."""

MIN_PUBLISH_INTERVAL_S = 0.5
"""Never gossip new metadata more often: each version costs a broadcast to the whole cluster."""

FREE_MEMORY_STEP = 0.05
"""A device's free memory must move by this fraction of its total to be worth gossiping."""

REFRESH_S = 5.0
"""Minor changes (queue depths, claims, small memory moves) go out at most this often."""

_FLAG_LEAVING = 0x01
_FLAG_TRUNCATED = 0x02


class BadMeta(PeerProtocolError):
    """A peer's metadata does not decode as a NodeMeta."""

    reason = "bad_meta"


@dataclass(frozen=True, slots=True)
class DeviceMeta:
    """One accelerator (or the host as a device), memory in MiB."""

    name: str
    total_mb: int
    free_mb: int
    claimed_mb: int


@dataclass(frozen=True, slots=True)
class ModelMeta:
    """A loaded model and the requests waiting on it (its queue depth)."""

    name: str
    queue: int = 0


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """Everything a peer needs to route to this node or place a model on it."""

    devices: tuple[DeviceMeta, ...] = ()
    loaded: tuple[ModelMeta, ...] = ()
    loading: tuple[str, ...] = ()
    zmq: str = ""
    """host:port of the legacy ZeroMQ front ("" if not served)."""
    http: str = ""
    """host:port of the HTTP front."""
    peer: str = ""
    """host:port of the peer RPC (ZMQ ROUTER) that forwarded requests go to."""
    generation: int = 0
    """The node's restart counter (persisted by the node): tells a restarted node's state apart."""
    leaving: bool = False
    """The node is draining: route nothing new to it."""
    truncated: bool = False
    """Set by `encode_meta` when lists were cut to fit the size limit."""
    primary_term: int = 0
    """The term this node acts as primary for; 0 when it is not primary. Set by the runner."""

    @property
    def model_names(self) -> frozenset[str]:
        """Return the names of the loaded models."""
        return frozenset(m.name for m in self.loaded)

    @property
    def queue_depth(self) -> int:
        """Return the requests queued on all loaded models together."""
        return sum(m.queue for m in self.loaded)

    def queue_of(self, model: str) -> int | None:
        """Return the queue depth of one loaded model, or None if it is not loaded here."""
        for m in self.loaded:
            if m.name == model:
                return m.queue
        return None


def _wire(meta: NodeMeta) -> list[Any]:
    flags = (_FLAG_LEAVING if meta.leaving else 0) | (_FLAG_TRUNCATED if meta.truncated else 0)
    return [
        META_VERSION,
        [[d.name, d.total_mb, d.free_mb, d.claimed_mb] for d in meta.devices],
        [[m.name, m.queue] for m in meta.loaded],
        list(meta.loading),
        [meta.zmq, meta.http, meta.peer],
        meta.generation,
        flags,
        meta.primary_term,
    ]


def _pack(meta: NodeMeta) -> bytes:
    return bytes(msgpack.packb(_wire(meta), use_bin_type=True))


def fit_meta(meta: NodeMeta, limit: int = MAX_META_BYTES) -> NodeMeta:
    """Return `meta` cut to encode within `limit` bytes (see the module docstring for the order).

    Raise LocalUsageError if even the empty lists do not fit (absurd address strings).
    """
    if len(_pack(meta)) <= limit:
        return meta
    m = dataclasses.replace(meta, truncated=True)
    for field in ("loading", "loaded", "devices"):
        while getattr(m, field) and len(_pack(m)) > limit:
            m = dataclasses.replace(m, **{field: getattr(m, field)[:-1]})
    size = len(_pack(m))
    if size > limit:
        raise LocalUsageError(f"node metadata needs {size} bytes with empty lists > {limit}")
    return m


def encode_meta(meta: NodeMeta, limit: int = MAX_META_BYTES) -> bytes:
    """Return the wire form of `meta`, degraded by `fit_meta` when it is too large."""
    _check_local(meta)
    return _pack(fit_meta(meta, limit))


def _check_local(meta: NodeMeta) -> None:
    for d in meta.devices:
        if min(d.total_mb, d.free_mb, d.claimed_mb) < 0:
            raise LocalUsageError(f"device {d.name!r}: memory figures must be >= 0")
    if any(m.queue < 0 for m in meta.loaded) or meta.generation < 0 or meta.primary_term < 0:
        raise LocalUsageError("queue depths, generation and primary_term must be >= 0")


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise BadMeta(f"{what}: expected a non-negative int")
    return v


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise BadMeta(f"{what}: expected a string")
    return v


def _list(v: Any, what: str, n: int | None = None) -> list[Any]:
    if type(v) is not list or (n is not None and len(v) != n):
        raise BadMeta(f"{what}: expected a list" + (f" of {n}" if n is not None else ""))
    return v


def decode_meta(data: bytes) -> NodeMeta:
    """Parse a peer's metadata; raise BadMeta naming the first bad field."""
    if len(data) > MAX_META_BYTES:
        raise BadMeta(f"{len(data)} bytes > {MAX_META_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadMeta(f"msgpack: {exc}") from None
    if type(raw) is not list or len(raw) < 8:
        raise BadMeta("expected an array of at least 8 fields")
    version = _int(raw[0], "version")
    if version != META_VERSION:
        raise BadMeta(f"version {version}, this node reads {META_VERSION}")
    devices = tuple(
        DeviceMeta(
            _str(d[0], "device name"),
            _int(d[1], "total_mb"),
            _int(d[2], "free_mb"),
            _int(d[3], "claimed_mb"),
        )
        for d in (_list(x, "device", 4) for x in _list(raw[1], "devices"))
    )
    loaded = tuple(
        ModelMeta(_str(m[0], "model name"), _int(m[1], "queue"))
        for m in (_list(x, "loaded model", 2) for x in _list(raw[2], "loaded"))
    )
    loading = tuple(_str(x, "loading model") for x in _list(raw[3], "loading"))
    zmq, http, peer = (_str(x, "address") for x in _list(raw[4], "addresses", 3))
    flags = _int(raw[6], "flags")
    return NodeMeta(
        devices=devices,
        loaded=loaded,
        loading=loading,
        zmq=zmq,
        http=http,
        peer=peer,
        generation=_int(raw[5], "generation"),
        leaving=bool(flags & _FLAG_LEAVING),
        truncated=bool(flags & _FLAG_TRUNCATED),
        primary_term=_int(raw[7], "primary_term"),
    )


def _major_change(old: NodeMeta, new: NodeMeta) -> bool:
    if old.model_names != new.model_names or set(old.loading) != set(new.loading):
        return True
    if (old.leaving, old.primary_term, old.generation) != (
        new.leaving,
        new.primary_term,
        new.generation,
    ):
        return True
    if (old.zmq, old.http, old.peer) != (new.zmq, new.http, new.peer):
        return True
    before = {d.name: d for d in old.devices}
    if set(before) != {d.name for d in new.devices}:
        return True
    for d in new.devices:
        o = before[d.name]
        total = max(d.total_mb, o.total_mb, 1)
        if abs(d.free_mb - o.free_mb) >= FREE_MEMORY_STEP * total:
            return True
    return False


def should_publish(
    old: NodeMeta | None, new: NodeMeta, last_sent_at: float | None, now: float
) -> bool:
    """Return whether `new` is worth gossiping, given what was last sent and when.

    Major changes (model set, loading set, a device's free memory by >= 5% of its total, the
    device list, addresses, leaving, primary term, generation) go out at most every 0.5 s;
    any other difference (queue depths, claims, small memory moves) at most every 5 s.
    """
    if old is None or last_sent_at is None:
        return True
    if new == old:
        return False
    since = now - last_sent_at
    if since < MIN_PUBLISH_INTERVAL_S:
        return False
    return _major_change(old, new) or since >= REFRESH_S
