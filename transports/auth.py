"""Who may call, and what a caller is told: API keys and the answers fit for any client.

Both fronts use these, so a key is checked the same way on HTTP and ZeroMQ, and neither
front tells a client where the node keeps its files.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from transports.errors import ErrorReply

__all__ = [
    "presented_key",
    "PATH_REFUSALS",
    "client_error",
    "KeyRing",
    "public_health",
]


class KeyRing:
    """The accepted API keys, compared in constant time (no key is kept in clear)."""

    def __init__(self, keys: Iterable[str]) -> None:
        # Digests have equal lengths, so compare_digest leaks neither content nor length.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        """Return True when keys are configured (auth is on)."""
        return bool(self._digests)

    def matches(self, presented: str) -> bool:
        """Tell whether `presented` is one of the keys, in time independent of which or how
        close."""
        # surrogatepass: any str hashes (a lone surrogate from JSON included) and never equals a key.
        probe = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = False
        for digest in self._digests:
            # No early exit: every key is compared whatever matched.
            found |= hmac.compare_digest(probe, digest)
        return found


def public_health(view: Mapping[str, Any]) -> dict[str, Any]:
    """Return a health body without component details (they may name files and devices):
    status and per-component status only, for callers that did not present a key."""
    components = view.get("components") or {}
    return {
        **view,
        "components": {name: {"status": c.get("status")} for name, c in components.items()},
    }


# What a client is told for a refusal whose message would show the node's directories.
PATH_REFUSALS = {
    "path_not_allowed": "model path is outside the model directories",
    "dataset_not_allowed": "dataset path is outside the dataset directories",
}


def client_error(err: ErrorReply) -> ErrorReply:
    """Return `err` as a client may see it: a path refusal loses the server's directories (its
    message names them; `classify` has logged it whole)."""
    safe = PATH_REFUSALS.get(err.code)
    return err if safe is None else replace(err, message=safe)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """Return the key in `X-API-Key` or `Authorization: Bearer` (HTTP headers or gRPC metadata,
    looked up case-insensitively), if any."""
    key = headers.get("X-API-Key")
    if key:
        return key
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None
