"""Who may connect to the legacy ZeroMQ port: a ZAP handler on the event loop, and where to bind.

libzmq asks the ZAP handler (RFC 27, a REP socket on inproc://zeromq.zap.01 in the server's
context) about every connection during its handshake: the peer's address, its mechanism (NULL
for plain legacy agents, CURVE for configured ones) and its CURVE public key. `zap_verdict`
decides from the configured allow-list and client keys; `ZapHandler` only moves the frames.
A denied peer never gets to send a request; each denial is counted by reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from transports.config import ZmqAuth
from transports.loop_socket import LoopSocket
from transports.metrics import ZAP_DENIED, ZMQ_CONNECTIONS_DROPPED

__all__ = [
    "LOOPBACK",
    "ZAP_DOMAIN",
    "ZAP_ENDPOINT",
    "address_allowed",
    "bind_host",
    "HandshakeMonitor",
    "parse_zap_request",
    "zap_reply",
    "zap_verdict",
    "ZapHandler",
    "ZapRequest",
    "ZapVerdict",
]

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"moc-node"
"""Set on the server socket: libzmq consults ZAP for NULL (keyless) peers only with a domain."""

@dataclass(frozen=True, slots=True)
class ZapRequest:
    """One ZAP question: who is connecting, and how."""

    request_id: bytes
    address: str
    mechanism: str
    client_key: bytes | None
    """The CURVE client's public key (Z85), None for other mechanisms."""


@dataclass(frozen=True, slots=True)
class ZapVerdict:
    """The answer to one ZAP question; `reason` labels a denial's count."""

    allowed: bool
    reason: str
    text: str


def parse_zap_request(frames: list[bytes]) -> ZapRequest | None:
    """Read a ZAP request (RFC 27); None when the frames are not one (libzmq sends good ones)."""
    if len(frames) < 6 or frames[0] != b"1.0":
        return None
    request_id, _domain, address, _identity, mechanism = frames[1:6]
    key = None
    if mechanism == b"CURVE" and len(frames) >= 7 and len(frames[6]) == 32:
        key = z85.encode(frames[6])
    return ZapRequest(
        request_id, address.decode("ascii", "replace"), mechanism.decode("ascii", "replace"), key
    )


def address_allowed(address: str, allow_from: tuple[Any, ...]) -> bool:
    """Tell whether `address` lies in one of the networks (an empty list allows all)."""
    if not allow_from:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in allow_from)


def zap_verdict(auth: ZmqAuth, req: ZapRequest) -> ZapVerdict:
    """Decide whether a connection may go on (pure)."""
    if not address_allowed(req.address, auth.allow_from):
        return ZapVerdict(False, "address", "address not allowed")
    if auth.curve_secret_key is not None:
        if req.mechanism != "CURVE" or req.client_key is None:
            return ZapVerdict(False, "mechanism", "CURVE required")
        clients: Set[bytes] | None = auth.curve_client_keys
        if clients is not None and req.client_key not in clients:
            return ZapVerdict(False, "curve_key", "client key not allowed")
    return ZapVerdict(True, "ok", "OK")


def zap_reply(request_id: bytes, verdict: ZapVerdict) -> list[bytes]:
    """Encode the ZAP reply: version, request id, status code and text, user id, metadata."""
    status = b"200" if verdict.allowed else b"400"
    return [b"1.0", request_id, status, verdict.text.encode("ascii"), b"", b""]


class ZapHandler:
    """Answer libzmq's ZAP requests for one context from the event loop."""

    def __init__(self, context: zmq.Context[Any], auth: ZmqAuth) -> None:
        self._auth = auth
        sock: zmq.Socket[bytes] = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._socket = LoopSocket(sock, self._on_frames)

    def close(self) -> None:
        """Stop answering (libzmq then refuses new CURVE peers and admits NULL ones only when
        no ZAP handler is required: close the server socket first)."""
        self._socket.close()

    def _on_frames(self, frames: list[bytes]) -> None:
        req = parse_zap_request(frames)
        if req is None:
            ZAP_DENIED.labels(reason="malformed").inc()
            request_id = frames[1] if len(frames) > 1 else b""
            reply = zap_reply(request_id, ZapVerdict(False, "malformed", "malformed request"))
        else:
            verdict = zap_verdict(self._auth, req)
            if not verdict.allowed:
                ZAP_DENIED.labels(reason=verdict.reason).inc()
                log.info("ZeroMQ connection from %s refused: %s", req.address, verdict.text)
            reply = zap_reply(req.request_id, verdict)
        try:
            self._socket.send(reply)
        except zmq.ZMQError as exc:  # the asking session is gone; libzmq drops it
            log.debug("ZAP reply not sent: %s", exc)


class HandshakeMonitor:
    """Count the connections libzmq drops during the handshake (socket monitor events)."""

    REASONS = {
        int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake_failed",
        int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol_error",
    }
    EVENTS = int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self._target = sock
        monitor: zmq.Socket[bytes] = sock.get_monitor_socket(self.EVENTS)
        self._socket = LoopSocket(monitor, self._on_frames)

    def close(self) -> None:
        """Stop monitoring (before the server socket closes)."""
        with contextlib.suppress(zmq.ZMQError):  # the socket may be closed already
            self._target.disable_monitor()
        self._socket.close()

    def _on_frames(self, frames: list[bytes]) -> None:
        # The first frame is the event number (uint16, little-endian) and its value (uint32).
        event = int.from_bytes(frames[0][:2], "little") if frames and frames[0] else 0
        reason = self.REASONS.get(event)
        if reason is not None:
            ZMQ_CONNECTIONS_DROPPED.labels(reason=reason).inc()


LOOPBACK = {4: "127.0.0.1", 6: "::1"}


def bind_host(host: str, *, keys_configured: bool, zmq_auth_configured: bool) -> str:
    """Return the address the ZeroMQ front binds: `host`, or loopback when API keys are set but
    nothing guards the ZeroMQ port (legacy agents send no key: the network must not reach it)."""
    if not keys_configured or zmq_auth_configured:
        return host
    if host == "localhost":
        return host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return LOOPBACK[4]  # a host name may resolve anywhere: stay on loopback
    return host if ip.is_loopback else LOOPBACK[ip.version]
