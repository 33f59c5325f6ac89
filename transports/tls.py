"""TLS for the HTTP and gRPC fronts: the PEM files `[server]` names, read once, and what serves
them.

`load_tls` reads and checks the files in the preflight (each failure is a ValueError whose
message starts with the config key to fix); `ssl_context` and `grpc_credentials` turn the same
bytes into what aiohttp's listener and grpcio's server take. TLS 1.2 is the oldest version
served; with a client CA, a client without a certificate signed by it is refused in the
handshake (mutual TLS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from transports.config import SECTION, ServerConfig

if TYPE_CHECKING:
    import grpc

__all__ = ["TlsMaterial", "grpc_credentials", "load_tls", "ssl_context"]

log = logging.getLogger(__name__)

CERT_KEY = f"{SECTION}.tls_cert_file"
KEY_KEY = f"{SECTION}.tls_key_file"
CLIENT_CA_KEY = f"{SECTION}.tls_client_ca_file"


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The PEM bytes of the fronts' certificate chain, its key and the optional client CA."""

    cert_chain: bytes
    """The server's certificate first, then any intermediates."""
    key: bytes = field(repr=False)
    """The unencrypted private key of the first certificate (never shown in a repr)."""
    client_ca: bytes | None = None
    """CA certificates a client's certificate must chain to; None: no client certificate asked."""


def load_tls(config: ServerConfig) -> TlsMaterial | None:
    """Read and check the TLS files of `config`; None when TLS is off.

    Raise ValueError naming the key of the file at fault: a certificate or key that is not
    PEM, an encrypted key (the node cannot ask for a passphrase), a key that does not match
    the certificate, a file that cannot be read.
    """
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    cert_chain = _read(CERT_KEY, config.tls_cert_file)
    key = _read(KEY_KEY, config.tls_key_file)
    if os.stat(config.tls_key_file).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # As ssh does for its keys, but a warning: refusing would break a working deployment.
        log.warning(
            "%s: %s is readable by other users; make it mode 0600", KEY_KEY, config.tls_key_file
        )
    client_ca = None
    if config.tls_client_ca_file is not None:
        client_ca = _read(CLIENT_CA_KEY, config.tls_client_ca_file)
    material = TlsMaterial(cert_chain, key, client_ca)
    check(material)
    return material


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{key}: {path!r}: cannot read it: {exc.strerror or exc}") from None


def check(material: TlsMaterial) -> None:
    """Raise ValueError, naming the config key at fault, unless `material` can serve TLS."""
    certs = _certificates(material.cert_chain, CERT_KEY)
    try:
        private = serialization.load_pem_private_key(material.key, password=None)
    except TypeError:
        raise ValueError(f"{KEY_KEY}: the key is encrypted; give it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{KEY_KEY}: not a PEM private key") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certs[0].public_key().public_bytes(der, raw) != private.public_key().public_bytes(der, raw):
        raise ValueError(f"{KEY_KEY}: does not match the first certificate of {CERT_KEY}")
    if material.client_ca is not None:
        _certificates(material.client_ca, CLIENT_CA_KEY)
    try:
        ssl_context(material)
    except ssl.SSLError as exc:  # what cryptography accepts and OpenSSL does not
        raise ValueError(f"{CERT_KEY}: OpenSSL refuses the pair: {exc.reason or exc}") from None


def _certificates(pem: bytes, key: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"{key}: not PEM certificates") from None
    if not certs:  # pragma: no cover - cryptography raises on an empty bundle
        raise ValueError(f"{key}: holds no certificate")
    return certs


def ssl_context(material: TlsMaterial) -> ssl.SSLContext:
    """Return a server-side context for `material`: TLS 1.2 or later, HTTP/1.1 by ALPN, and a
    client certificate required when a client CA is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL loads a certificate chain and key from paths only: hand it in-memory files.
    with _memory_file(material.cert_chain) as cert, _memory_file(material.key) as key:
        context.load_cert_chain(cert, key)
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """Yield a path to `data` held in memory only (Linux memfd): the key never touches a disk."""
    fd = os.memfd_create("moc-node-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def grpc_credentials(material: TlsMaterial) -> grpc.ServerCredentials:
    """Return grpcio server credentials for `material` (client certificates required with a CA)."""
    import grpc

    return grpc.ssl_server_credentials(
        [(material.key, material.cert_chain)],
        root_certificates=material.client_ca,
        require_client_auth=material.client_ca is not None,
    )
