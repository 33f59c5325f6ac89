"""The `[server]` section: where the transports listen and how much they accept.

One frozen dataclass; `moc_node`'s config loader composes it and checks the types; the values
are checked here, each error naming its key, so a bad file stops the start with one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

SECTION = "server"


class ConfigError(ValueError):
    """A `[server]` key is unknown or holds a bad value; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Listening addresses, auth, size limits and timeouts of the ZMQ and HTTP fronts."""

    host: str = "127.0.0.1"
    """Address both servers bind. Loopback by default because an empty key list means no auth;
    production configs set "0.0.0.0" together with api_keys."""

    zmq_port: int = 7211
    """TCP port of the legacy ZeroMQ ROUTER. 7211 is the legacy agents' port (a contract).
    0 binds a free port (tests)."""

    rest_port: int = 8008
    """TCP port of the HTTP server (legacy REST, OpenAI-compatible API, /metrics). 8008 is the
    legacy port (a contract). 0 binds a free port (tests)."""

    max_workers: int = 16
    """How many ZMQ requests that call into the node (infer, load, unload) run at once. Cheap
    actions (health, list_models, status) are answered at once and do not count, so a slow infer
    never delays a health check. 16 is the legacy value; the per-model bulkhead, not this, bounds
    work per model."""

    max_pending: int = 256
    """ZMQ requests allowed to wait for one of `max_workers` slots; past that the server answers
    "overloaded" at once instead of queueing without bound. 256 matches the bulkhead queue."""

    api_keys: tuple[str, ...] = ()
    """Accepted API keys (`X-API-Key` or `Authorization: Bearer`). Empty together with no
    `api_key_file` means no auth at all: dev only, logged as a warning at start. Keys are
    compared in constant time and never logged."""

    api_key_file: str | None = None
    """File with more keys, one per line (blank lines and `#` comments skipped), so keys can stay
    out of the config file. Read once at start; None reads nothing."""

    open_paths: tuple[str, ...] = ("/health", "/metrics")
    """HTTP paths answered without a key even when keys are set, so load balancers and
    Prometheus need no secret. Everything else needs a key when keys are configured."""

    max_body_bytes: int = 1_048_576
    """Largest HTTP request body in bytes (1 MiB); larger ones get 413 before being read whole.
    A 10,000-character prompt is at most 40 KB of UTF-8, so 1 MiB leaves room for chat histories
    while bounding memory per request."""

    max_frame_bytes: int = 1_048_576
    """Largest ZMQ request frame in bytes (1 MiB); larger ones get an error reply and are
    counted. Same reasoning as max_body_bytes."""

    zmq_max_msg_bytes: int = 8_388_608
    """Hard ceiling handed to libzmq as ZMQ_MAXMSGSIZE (8 MiB): a peer sending more is
    disconnected by libzmq without the message being buffered, so no reply is possible. Between
    max_frame_bytes and this, the frame is read and answered with an error."""

    request_timeout_s: float = 120.0
    """Seconds an inference may take end to end (queue wait plus generation) before it is
    cancelled and answered 504. Two minutes covers 2048 tokens on a CPU at ~20 tokens/s."""

    load_timeout_s: float = 600.0
    """Seconds a load or unload may take before the client gets 504. Ten minutes covers reading
    tens of GB of weights from slow disks; the load itself is not cancelled by the timeout."""

    body_read_timeout_s: float = 30.0
    """Seconds an HTTP client has to send its whole body; a stalled sender gets 408 and frees the
    connection instead of holding it."""

    stream_write_timeout_s: float = 30.0
    """Seconds one server-sent event may wait for a client that stopped reading; past it the
    stream is closed and generation cancelled, so a stalled reader cannot pin a model."""

    shutdown_timeout_s: float = 10.0
    """Seconds `stop()` lets in-flight requests finish before cancelling them."""

    def __post_init__(self) -> None:
        """Reject values that cannot work, naming the key (without the section, as the
        node's config loader prefixes it)."""
        for name in ("zmq_port", "rest_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name}: {port} is not a TCP port (0..65535)")
        for name in ("max_workers", "max_body_bytes", "max_frame_bytes", "zmq_max_msg_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.max_pending < 0:
            raise ConfigError("max_pending: must be 0 or more")
        if self.zmq_max_msg_bytes < self.max_frame_bytes:
            raise ConfigError("zmq_max_msg_bytes: must be >= max_frame_bytes")
        for name in (
            "request_timeout_s",
            "load_timeout_s",
            "body_read_timeout_s",
            "stream_write_timeout_s",
            "shutdown_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: must be a positive number of seconds")
        for path in self.open_paths:
            if not path.startswith("/"):
                raise ConfigError(f"open_paths: {path!r} must start with '/'")
        if any(not key for key in self.api_keys):
            raise ConfigError("api_keys: keys must not be empty strings")

    @property
    def auth_configured(self) -> bool:
        """True when a key list or key file is set, so requests need a key."""
        return bool(self.api_keys) or self.api_key_file is not None


def load_api_keys(config: ServerConfig) -> frozenset[str]:
    """Return every accepted key: the configured ones plus those of `api_key_file`."""
    keys = set(config.api_keys)
    if config.api_key_file is not None:
        try:
            text = Path(config.api_key_file).read_text(encoding="utf-8")
        except OSError as exc:
            # The message names the file, never its contents.
            raise ConfigError(
                f"{SECTION}.api_key_file: cannot read {config.api_key_file}: {exc.strerror}"
            ) from None
        for line in text.splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                keys.add(key)
        if not keys:
            raise ConfigError(f"{SECTION}.api_key_file: {config.api_key_file} holds no key")
    return frozenset(keys)
