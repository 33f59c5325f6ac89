"""The preflight reads the TLS files once; a pair that cannot serve stops the start with one line.

Certificates come from trustme; the bad files are real files (garbage, a mismatched key, an
encrypted key, a directory, a missing path) in `tmp_path`. One case runs the real `moc-node run`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from moc_node.preflight import preflight
from tests.moc_node.test_preflight import config_of, free_port, refusal, table


@dataclass(frozen=True)
class Pem:
    """The files of a good setup: a certificate, its key, a client CA."""

    cert: Path
    key: Path
    client_ca: Path


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pem(tmp_path: Path, ca: trustme.CA) -> Pem:
    issued = ca.issue_cert("127.0.0.1")
    files = Pem(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "clients.pem")
    issued.cert_chain_pems[0].write_to_path(str(files.cert))
    issued.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    trustme.CA().cert_pem.write_to_path(str(files.client_ca))
    return files


def tls(pem: Pem, **overrides: str) -> dict[str, str]:
    files = {
        "tls_cert_file": str(pem.cert),
        "tls_key_file": str(pem.key),
        "tls_client_ca_file": str(pem.client_ca),
    }
    return {**files, **overrides}


def test_a_good_pair_and_client_ca_are_read_once_into_the_keys(tmp_path: Path, pem: Pem) -> None:
    keys = preflight(config_of(tmp_path, server=tls(pem)))
    assert keys.tls is not None
    assert keys.tls.cert_chain == pem.cert.read_bytes()
    assert keys.tls.key == pem.key.read_bytes()
    assert keys.tls.client_ca == pem.client_ca.read_bytes()
    assert pem.key.read_bytes().decode() not in repr(keys)  # the key never shows in a repr


def test_without_tls_files_the_keys_hold_no_tls(tmp_path: Path) -> None:
    assert preflight(config_of(tmp_path)).tls is None


def encrypted_key(pem: Pem, path: Path) -> None:
    key = serialization.load_pem_private_key(pem.key.read_bytes(), password=None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


def other_key(pem: Pem, path: Path) -> None:
    trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(path))
    path.chmod(0o600)


BAD: list[tuple[str, str, str, str]] = [
    # (case, the file to spoil, how, the key the line must name and what it says)
    ("garbage-certificate", "tls_cert_file", "garbage", "server.tls_cert_file: not PEM certificates"),
    ("garbage-key", "tls_key_file", "garbage", "server.tls_key_file: not a PEM private key"),
    ("key-of-another-certificate", "tls_key_file", "other-key", "server.tls_key_file: does not match"),
    ("encrypted-key", "tls_key_file", "encrypted", "server.tls_key_file: the key is encrypted"),
    ("missing-certificate", "tls_cert_file", "missing", "server.tls_cert_file: "),
    ("key-a-directory", "tls_key_file", "directory", "server.tls_key_file: "),
    ("garbage-client-ca", "tls_client_ca_file", "garbage", "server.tls_client_ca_file: not PEM"),
    ("missing-client-ca", "tls_client_ca_file", "missing", "server.tls_client_ca_file: "),
    ("empty-key", "tls_key_file", "empty", "server.tls_key_file: not a PEM private key"),
]


@pytest.mark.parametrize(("key", "how", "line"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_tls_file_that_cannot_serve_is_one_line_naming_its_key(
    tmp_path: Path, pem: Pem, key: str, how: str, line: str
) -> None:
    spoilt = tmp_path / f"spoilt-{key}"
    if how == "garbage":
        spoilt.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END")
    elif how == "empty":
        spoilt.write_bytes(b"")
    elif how == "directory":
        spoilt.mkdir()
    elif how == "encrypted":
        encrypted_key(pem, spoilt)
    elif how == "other-key":
        other_key(pem, spoilt)
    text = refusal(config_of(tmp_path, server=tls(pem, **{key: str(spoilt)})))
    assert text.startswith(line)
    if how == "missing":
        assert "does not exist" in text
    if how == "directory":
        assert "not a regular file" in text
    assert "PRIVATE KEY" not in text and "not base64" not in text  # never the file's contents


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_key_file_names_the_key_file(tmp_path: Path, pem: Pem) -> None:
    pem.key.chmod(0)
    text = refusal(config_of(tmp_path, server=tls(pem)))
    assert text.startswith("server.tls_key_file: ")
    assert "Permission denied" in text


def test_moc_node_run_with_a_mismatched_key_exits_2_with_one_line_before_any_port(
    tmp_path: Path, pem: Pem
) -> None:
    other_key(pem, pem.key)
    rest = free_port()
    data = table(tmp_path, server={**tls(pem), "rest_port": rest, "zmq_port": free_port()})
    config = tmp_path / "node.toml"
    config.write_text(_toml(data), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOC_")}
    done = subprocess.run(
        [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    # Each listener logs when it binds: a single line means none was bound.
    assert done.stderr.splitlines() == [
        "moc-node: config error: server.tls_key_file: does not match the first certificate "
        "of server.tls_cert_file"
    ]
    assert not (tmp_path / "state").exists()


def _toml(data: dict[str, dict[str, object]]) -> str:
    """Write the two levels of a preflight table as TOML (strings, ints, string lists)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            shown = value if isinstance(value, int) else _quoted(value)
            lines.append(f"{key} = {shown}")
    return "\n".join(lines) + "\n"


def _quoted(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_quoted(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_a_key_file_others_may_read_is_served_with_a_warning_to_make_it_0600(
    tmp_path: Path, pem: Pem, caplog: pytest.LogCaptureFixture
) -> None:
    pem.key.chmod(0o644)
    assert preflight(config_of(tmp_path, server=tls(pem))).tls is not None
    assert "server.tls_key_file" in caplog.text and "0600" in caplog.text
    caplog.clear()
    pem.key.chmod(0o600)
    preflight(config_of(tmp_path, server=tls(pem)))
    assert "0600" not in caplog.text
