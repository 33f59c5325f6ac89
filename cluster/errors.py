"""The cluster package's errors: misuse of the API apart from garbage sent by a peer."""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "LocalUsageError",
    "MalformedPacket",
    "OversizedPacket",
    "PeerProtocolError",
    "Unauthenticated",
    "UnsupportedVersion",
]


class ClusterError(Exception):
    """Base of every error the cluster package raises."""


class LocalUsageError(ClusterError, ValueError):
    """The caller misused the API (metadata too large, message too big to ever send)."""


class PeerProtocolError(ClusterError):
    """A peer sent bytes we must drop; `reason` labels the drop counter."""

    reason = "malformed"


class MalformedPacket(PeerProtocolError):
    """The bytes do not decode to a known message."""

    reason = "malformed"


class OversizedPacket(PeerProtocolError):
    """The datagram or stream frame is larger than the configured limit."""

    reason = "oversized"


class Unauthenticated(PeerProtocolError):
    """No key of the keyring verifies the packet's HMAC."""

    reason = "unauthenticated"


class UnsupportedVersion(PeerProtocolError):
    """The packet carries a protocol version this node does not speak."""

    reason = "version"
