"""The CLI against a node serving HTTPS with mutual TLS: --ca-file trusts the node's CA,
--cert-file/--key-file present the client's certificate; without them the CLI is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from moc_node.cli import main
from tests.transports.conftest import FakeNode, server_config
from transports.http import HttpServer
from transports.tls import TlsMaterial, ssl_context


@pytest.fixture
async def https(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A node served over mutual TLS; the CA file and a client cert and key in tmp_path."""
    ca, clients = trustme.CA(), trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    material = TlsMaterial(
        issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes(), clients.cert_pem.bytes()
    )
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    agent = clients.issue_cert("operator@example.com")
    agent.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    agent.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    server = HttpServer(FakeNode(), server_config(), ssl_context=ssl_context(material))
    await server.start()
    yield f"https://127.0.0.1:{server.port}", tmp_path
    await server.stop()


async def test_the_cli_reaches_a_mutual_tls_node_with_its_ca_and_client_certificate(
    https: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, files = https
    argv = [
        "models",
        "--url",
        url,
        "--ca-file",
        str(files / "ca.pem"),
        "--cert-file",
        str(files / "client.pem"),
        "--key-file",
        str(files / "client.key"),
    ]
    assert await asyncio.to_thread(main, argv) == 0
    assert "tiny" in capsys.readouterr().out


async def test_the_cli_without_a_client_certificate_is_refused_with_one_error(
    https: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, files = https
    argv = ["models", "--url", url, "--ca-file", str(files / "ca.pem")]
    assert await asyncio.to_thread(main, argv) == 1
    assert "error:" in capsys.readouterr().out


async def test_a_ca_file_that_does_not_exist_is_one_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["status", "--url", "https://127.0.0.1:1", "--ca-file", str(tmp_path / "none.pem")]
    assert await asyncio.to_thread(main, argv) == 1
    assert "cannot use the TLS files" in capsys.readouterr().out
