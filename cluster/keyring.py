"""Cluster keys: HMAC-SHA256 signing with the first key, verification with any (rotation)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

from cluster.errors import LocalUsageError

TAG_BYTES = 32
"""HMAC-SHA256 tag length; the full digest, no truncation."""

MIN_KEY_BYTES = 16


class Keyring:
    """An ordered set of keys: `keys[0]` signs, every key is tried when verifying."""

    __slots__ = ("keys",)

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise LocalUsageError(f"cluster key shorter than {MIN_KEY_BYTES} bytes")
        self.keys = keys

    @property
    def enabled(self) -> bool:
        """Return whether packets are signed at all (an empty keyring: tests only)."""
        return bool(self.keys)

    def sign(self, data: bytes) -> bytes:
        """Return the tag of `data` under the primary key."""
        return hmac.digest(self.keys[0], data, hashlib.sha256)

    def verify(self, data: bytes, tag: bytes) -> bool:
        """Return whether any key produces `tag` for `data` (constant time per key)."""
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(hmac.digest(key, data, hashlib.sha256), tag)
        return ok


def parse_keys(text: str) -> Keyring:
    """Parse one key per line (hex or base64; blank lines and # comments skipped)."""
    keys: list[bytes] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            try:
                key = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                raise LocalUsageError(f"key file line {lineno}: neither hex nor base64") from None
        if len(key) < MIN_KEY_BYTES:
            raise LocalUsageError(f"key file line {lineno}: key shorter than {MIN_KEY_BYTES} bytes")
        keys.append(key)
    if not keys:
        raise LocalUsageError("key file holds no key")
    return Keyring(tuple(keys))


def read_key_file(path: str | Path) -> Keyring:
    """Read and parse a key file (see `parse_keys`)."""
    return parse_keys(Path(path).read_text(encoding="ascii"))
