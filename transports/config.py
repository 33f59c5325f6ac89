"""The `[server]` section: where the transports listen and how much they accept.

One frozen dataclass; `moc_node`'s config loader composes it and checks the types; the values
are checked here, each error naming its key, so a bad file stops the start with one line.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = [
    "SECTION",
    "is_z85_key",
    "load_api_keys",
    "load_zmq_auth",
    "ServerConfig",
    "ServerConfigError",
    "ZmqAuth",
]

SECTION = "server"


class ServerConfigError(ValueError):
    """A `[server]` key is unknown or holds a bad value; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Listening addresses, auth, size limits and timeouts of the ZMQ and HTTP fronts."""

    host: str = "127.0.0.1"
    """Address both servers bind. Loopback by default because an empty key list means no auth;
    production configs set "0.0.0.0" together with api_keys. With keys set but no ZeroMQ auth
    (zmq_allow_from, zmq_curve_secret_key_file, zmq_require_api_key), the ZeroMQ front still
    binds loopback only and says so in a warning: legacy agents send no key."""

    zmq_port: int = 7211
    """TCP port of the legacy ZeroMQ ROUTER. 7211 is the legacy agents' port (a contract).
    0 binds a free port (tests)."""

    rest_port: int = 8008
    """TCP port of the HTTP server (legacy REST, OpenAI-compatible API, /metrics). 8008 is the
    legacy port (a contract). 0 binds a free port (tests)."""

    grpc_port: int = 7212
    """TCP port of the legacy gRPC `ModelOps` service (and grpc.health.v1.Health). 7212 is the
    legacy port (a contract). 0 binds a free port (tests)."""

    tls_cert_file: str | None = None
    """PEM certificate chain the HTTP and gRPC fronts present; with tls_key_file both serve TLS
    only (a plain-text client is refused). None serves plain text."""

    tls_key_file: str | None = None
    """PEM private key of tls_cert_file. Both are set or neither."""

    tls_client_ca_file: str | None = None
    """PEM CA bundle for mutual TLS: when set, HTTP and gRPC clients must present a certificate
    signed by one of these CAs. Needs tls_cert_file and tls_key_file."""

    max_workers: int = 16
    """How many ZMQ and gRPC requests that call into the node (infer, load, unload) run at
    once, per front. Cheap
    actions (health, list_models, status) are answered at once and do not count, so a slow infer
    never delays a health check. 16 is the legacy value; the per-model bulkhead, not this, bounds
    work per model."""

    max_pending: int = 256
    """ZMQ and gRPC requests allowed to wait for one of `max_workers` slots; past that the
    server answers "overloaded" (gRPC: RESOURCE_EXHAUSTED) at once instead of queueing without
    bound. 256 matches the bulkhead queue."""

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
    """Largest HTTP request body and gRPC message in bytes (1 MiB); larger ones get 413
    (gRPC: RESOURCE_EXHAUSTED) before being read whole.
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

    header_read_timeout_s: float = 15.0
    """Seconds an HTTP client has, from connecting (or from the first byte of its next request on
    a kept-alive connection), to send a complete request head; past it the connection is closed
    (408 when part of a head came) and counted. A real client sends its head in one packet;
    15 s covers four lost TCP retransmissions (1 + 2 + 4 + 8 s) on a bad link."""

    keepalive_timeout_s: float = 75.0
    """Seconds an idle kept-alive HTTP connection stays open waiting for the next request.
    Shorter frees sockets sooner but must stay above a reverse proxy's own idle timeout, or the
    proxy may send a request on a connection the node is closing; 75 s is above nginx's 60 s
    upstream default (and is aiohttp's own run_app default)."""

    max_connections_per_ip: int = 256
    """Open HTTP connections allowed from one client address; past it a new connection gets 503
    with Retry-After and is closed, and counted. Behind a reverse proxy every client shares the
    proxy's address, so the cap must cover the proxy's pool: 256 is 4x the bulkhead's 64
    concurrent requests. 0 turns the cap off."""

    zmq_handshake_timeout_s: float = 10.0
    """Seconds a ZeroMQ peer has to finish the ZMTP handshake (CURVE and the ZAP check included),
    libzmq's ZMQ_HANDSHAKE_IVL: a peer that connects and sends a partial greeting is dropped
    (counted in moc_zmq_connections_dropped_total). libzmq's own default is 30 s; a LAN agent
    finishes in milliseconds."""

    zmq_allow_from: tuple[str, ...] = ()
    """Addresses or networks (CIDR, IPv4 or IPv6) whose ZeroMQ connections are accepted, checked
    by a ZAP handler at connect time: unchanged legacy agents on known hosts keep working, any
    other host is refused before it can send a request (counted in
    moc_zmq_auth_denied_total). Empty accepts every address (then CURVE or zmq_require_api_key
    must guard the port when api_keys are set)."""

    zmq_curve_secret_key_file: str | None = None
    """The ZeroMQ server's CURVE secret key: a ZPL certificate file as `zmq.auth.
    create_certificates` writes (`*.key_secret`), or a file holding the 40-character Z85 secret
    key. When set the port speaks CURVE only (encrypted, clients must know the server's public
    key), so agents need configuring: unchanged plain REQ agents can no longer connect."""

    zmq_curve_client_keys_file: str | None = None
    """File of the CURVE client public keys allowed to connect (Z85, one per line; blank lines
    and `#` comments skipped). None with a server key accepts any client that knows the server's
    public key. Needs zmq_curve_secret_key_file."""

    zmq_require_api_key: bool = False
    """When true every ZeroMQ request except `health` must carry one of the api_keys in its
    `api_key` field (beside action and payload), refused with `unauthorized` otherwise. A
    request that carries a wrong key is refused whatever this says. False leaves requests
    without a key to the connection's own checks (allow-list, CURVE, loopback)."""

    def __post_init__(self) -> None:
        """Reject values that cannot work, naming the key (without the section, as the
        node's config loader prefixes it)."""
        for name in ("zmq_port", "rest_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ServerConfigError(f"{name}: {port} is not a TCP port (0..65535)")
        for name in ("max_workers", "max_body_bytes", "max_frame_bytes", "zmq_max_msg_bytes"):
            if getattr(self, name) < 1:
                raise ServerConfigError(f"{name}: must be at least 1")
        if self.max_pending < 0:
            raise ServerConfigError("max_pending: must be 0 or more")
        if self.zmq_max_msg_bytes < self.max_frame_bytes:
            raise ServerConfigError("zmq_max_msg_bytes: must be >= max_frame_bytes")
        if self.max_connections_per_ip < 0:
            raise ServerConfigError("max_connections_per_ip: must be 0 (no cap) or more")
        for name in (
            "request_timeout_s",
            "load_timeout_s",
            "body_read_timeout_s",
            "stream_write_timeout_s",
            "shutdown_timeout_s",
            "header_read_timeout_s",
            "keepalive_timeout_s",
            "zmq_handshake_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ServerConfigError(f"{name}: must be a positive number of seconds")
        for path in self.open_paths:
            if not path.startswith("/"):
                raise ServerConfigError(f"open_paths: {path!r} must start with '/'")
        if any(not key for key in self.api_keys):
            raise ServerConfigError("api_keys: keys must not be empty strings")
        if self.zmq_handshake_timeout_s * 1000 >= 2**31:
            raise ServerConfigError("zmq_handshake_timeout_s: must be below 2^31 milliseconds")
        for entry in self.zmq_allow_from:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ServerConfigError(
                    f"zmq_allow_from: {entry!r} is not an IP address or network (CIDR)"
                ) from None
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ServerConfigError("tls_key_file: tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ServerConfigError("tls_client_ca_file: needs tls_cert_file and tls_key_file")
        if self.zmq_curve_client_keys_file is not None and self.zmq_curve_secret_key_file is None:
            raise ServerConfigError(
                "zmq_curve_client_keys_file: needs zmq_curve_secret_key_file (the server's key)"
            )
        if self.zmq_require_api_key and not self.auth_configured:
            raise ServerConfigError("zmq_require_api_key: needs api_keys or api_key_file")

    @property
    def auth_configured(self) -> bool:
        """True when a key list or key file is set, so requests need a key."""
        return bool(self.api_keys) or self.api_key_file is not None

    @property
    def zmq_auth_configured(self) -> bool:
        """True when the ZeroMQ port checks who connects or what requests carry."""
        return (
            bool(self.zmq_allow_from)
            or self.zmq_curve_secret_key_file is not None
            or self.zmq_require_api_key
        )


def load_api_keys(config: ServerConfig) -> frozenset[str]:
    """Return every accepted key: the configured ones plus those of `api_key_file`."""
    keys = set(config.api_keys)
    if config.api_key_file is not None:
        try:
            text = Path(config.api_key_file).read_text(encoding="utf-8")
        except OSError as exc:
            # The message names the file, never its contents.
            raise ServerConfigError(
                f"{SECTION}.api_key_file: cannot read {config.api_key_file}: {exc.strerror}"
            ) from None
        for line in text.splitlines():
            key = line.strip()
            if key and not key.startswith("#"):
                keys.add(key)
        if not keys:
            raise ServerConfigError(f"{SECTION}.api_key_file: {config.api_key_file} holds no key")
    return frozenset(keys)


@dataclass(frozen=True, slots=True)
class ZmqAuth:
    """What the ZeroMQ front checks, read and validated from `[server]` and the files it names."""

    allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Networks whose connections are accepted; empty accepts any address."""
    curve_public_key: bytes | None = None
    """The server's Z85 public key (what clients configure); None without CURVE."""
    curve_secret_key: bytes | None = None
    """The server's Z85 secret key; None without CURVE."""
    curve_client_keys: frozenset[bytes] | None = None
    """Z85 client public keys allowed; None accepts any client that knows the server key."""

    @property
    def needs_zap(self) -> bool:
        """True when connections are checked by the ZAP handler (allow-list or CURVE)."""
        return bool(self.allow_from) or self.curve_secret_key is not None


def load_zmq_auth(config: ServerConfig) -> ZmqAuth:
    """Read the ZeroMQ auth settings and the CURVE key files they name; raise ServerConfigError
    naming the key when a file is unreadable or holds no valid key (never showing a key)."""
    allow = tuple(ipaddress.ip_network(entry, strict=False) for entry in config.zmq_allow_from)
    if config.zmq_curve_secret_key_file is None:
        return ZmqAuth(allow_from=allow)
    public, secret = _read_server_key(config.zmq_curve_secret_key_file)
    clients: frozenset[bytes] | None = None
    if config.zmq_curve_client_keys_file is not None:
        clients = _read_client_keys(config.zmq_curve_client_keys_file)
    return ZmqAuth(allow, public, secret, clients)


def _read_text(key: str, path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ServerConfigError(f"{SECTION}.{key}: cannot read {path}: {why}") from None


def is_z85_key(text: str) -> bool:
    """Tell whether `text` is a 40-character Z85 CURVE key."""
    return len(text) == 40 and all(ord(c) < 128 and ord(c) in z85.Z85CHARS for c in text)


def _read_server_key(path: str) -> tuple[bytes, bytes]:
    key = "zmq_curve_secret_key_file"
    text = _read_text(key, path).strip()
    if is_z85_key(text):
        secret = text.encode("ascii")
        return zmq.curve_public(secret), secret
    try:
        public, secret_or_none = zmq.auth.load_certificate(path)
    except (ValueError, OSError, KeyError):
        secret_or_none = None
    if secret_or_none is None or not is_z85_key(secret_or_none.decode("ascii", "replace")):
        raise ServerConfigError(
            f"{SECTION}.{key}: {path} holds neither a Z85 secret key nor a secret certificate"
        )
    if zmq.curve_public(secret_or_none) != public:
        raise ServerConfigError(
            f"{SECTION}.{key}: {path}: the public key does not match the secret"
        )
    return public, secret_or_none


def _read_client_keys(path: str) -> frozenset[bytes]:
    key = "zmq_curve_client_keys_file"
    found: set[bytes] = set()
    for number, line in enumerate(_read_text(key, path).splitlines(), start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if not is_z85_key(entry):
            raise ServerConfigError(
                f"{SECTION}.{key}: {path} line {number} is not a Z85 public key"
            )
        found.add(entry.encode("ascii"))
    if not found:
        raise ServerConfigError(f"{SECTION}.{key}: {path} holds no key")
    return frozenset(found)
