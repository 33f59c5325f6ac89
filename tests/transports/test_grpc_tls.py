"""gRPC over TLS: a secure channel trusting the test CA is served, a plain-text one is refused,
both on a GrpcServer given credentials and on a whole node whose [server] names the files."""

from __future__ import annotations

import dataclasses
import os
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import trustme
from google.protobuf import empty_pb2

from moc_node.app import Front, Runtime, default_servers, serve
from moc_node.config import Config
from moc_node.node import Node
from moc_node.preflight import Keys, preflight
from tests.moc_node.conftest import make_config
from tests.transports.conftest import FakeNode, server_config
from transports.grpc_gen import modelops_pb2 as pb
from transports.grpc_gen import modelops_pb2_grpc as pb_grpc
from transports.grpc_server import GrpcServer
from transports.tls import TlsMaterial, grpc_credentials

OVERRIDE = (("grpc.ssl_target_name_override", "localhost"),)


@pytest.fixture(scope="module", name="ca")
def ca_fixture() -> trustme.CA:
    return trustme.CA()


def trusting(ca: trustme.CA) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())


async def list_models(target: str, credentials: grpc.ChannelCredentials | None) -> Any:
    """Call ListModels over a secure channel (or a plain one when `credentials` is None)."""
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials, options=OVERRIDE)
    )
    async with channel:
        return await pb_grpc.ModelOpsStub(channel).ListModels(empty_pb2.Empty(), timeout=10)


@pytest.fixture(name="tls_server")
async def tls_server_fixture(ca: trustme.CA) -> AsyncIterator[GrpcServer]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    material = TlsMaterial(
        cert_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        key=cert.private_key_pem.bytes(),
    )
    server = GrpcServer(FakeNode(), server_config(), credentials=grpc_credentials(material))
    await server.start()
    yield server
    await server.stop()


async def test_a_secure_channel_trusting_the_ca_is_served_and_a_plain_one_is_refused(
    tls_server: GrpcServer, ca: trustme.CA
) -> None:
    target = f"127.0.0.1:{tls_server.port}"
    reply = await list_models(target, trusting(ca))
    assert reply.models
    with pytest.raises(grpc.aio.AioRpcError) as plain:
        await list_models(target, None)
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as stranger:
        await list_models(target, trusting(trustme.CA()))
    assert stranger.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_node_whose_config_names_a_certificate_serves_grpc_and_https_over_tls_only(
    tmp_path: Path, ca: trustme.CA
) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "node.crt", tmp_path / "node.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    config = make_config(tmp_path, tmp_path / "models")
    config = dataclasses.replace(
        config,
        server=server_config(tls_cert_file=str(cert_file), tls_key_file=str(key_file)),
    )
    (tmp_path / "models").mkdir()
    fronts: list[Front] = []
    seen: dict[str, Any] = {}

    def servers(node: Node, config: Config, keys: Keys) -> list[Front]:
        fronts.extend(default_servers(node, config, keys))
        return fronts

    async def probe(runtime: Runtime) -> None:
        ports = {front.listener.key: front.server.port for front in fronts}
        target = f"127.0.0.1:{ports['server.grpc_port']}"
        try:
            seen["secure"] = await list_models(target, trusting(ca))
            try:
                await list_models(target, None)
            except grpc.aio.AioRpcError as exc:
                seen["plain"] = exc.code()
            context = ssl.create_default_context()
            ca.configure_trust(context)
            url = f"https://127.0.0.1:{ports['server.rest_port']}/health"
            async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as resp:
                seen["https"] = resp.status
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the way an operator stops it

    assert await serve(config, preflight(config), servers=servers, started=probe) == 0
    assert isinstance(seen["secure"], pb.ModelList)
    assert seen["plain"] == grpc.StatusCode.UNAVAILABLE
    assert seen["https"] == 200
