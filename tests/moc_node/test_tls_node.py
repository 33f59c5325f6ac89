"""A whole node over TLS, wired by `default_servers` from the files the preflight read: the
official `openai` client over HTTPS and a grpc secure channel (mutual TLS) reach it; plain text
is refused on both ports."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import trustme
from google.protobuf import empty_pb2

from moc_node.app import Front, Runtime, default_servers, serve
from moc_node.config import Config
from moc_node.node import Node
from moc_node.preflight import Keys, preflight
from tests.moc_node.test_preflight import config_of
from transports.grpc_gen import modelops_pb2_grpc


def stub(channel: grpc.aio.Channel) -> Any:
    return modelops_pb2_grpc.ModelOpsStub(channel)  # type: ignore[no-untyped-call]


async def test_a_node_with_tls_files_serves_https_and_grpc_over_mutual_tls_only(
    tmp_path: Path,
) -> None:
    ca, clients = trustme.CA(), trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "key.pem").chmod(0o600)
    clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    config = config_of(
        tmp_path,
        server={
            "tls_cert_file": str(tmp_path / "cert.pem"),
            "tls_key_file": str(tmp_path / "key.pem"),
            "tls_client_ca_file": str(tmp_path / "clients.pem"),
        },
    )
    keys = preflight(config)
    agent = clients.issue_cert("agent@example.com")
    fronts: list[Front] = []
    seen: dict[str, object] = {}

    def servers(node: Node, config: Config, keys: Keys) -> list[Front]:
        fronts.extend(default_servers(node, config, keys))
        return fronts

    async def probe(runtime: Runtime) -> None:
        rest, grpc_port = fronts[0].server.port, fronts[2].server.port
        context = ssl.create_default_context()
        ca.configure_trust(context)
        agent.configure_cert(context)
        client = openai.AsyncOpenAI(
            base_url=f"https://127.0.0.1:{rest}/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx2.AsyncClient(verify=context),
        )
        async with client:
            seen["models"] = [m.id for m in (await client.models.list()).data]
        async with httpx2.AsyncClient() as plain:
            try:
                await plain.get(f"http://127.0.0.1:{rest}/health")
                seen["plain_http"] = "answered"
            except httpx2.HTTPError:
                seen["plain_http"] = "refused"
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=agent.private_key_pem.bytes(),
            certificate_chain=agent.cert_chain_pems[0].bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{grpc_port}", credentials) as channel:
            health = await stub(channel).HealthCheck(
                empty_pb2.Empty(), timeout=10
            )
            seen["grpc_health"] = health.status
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            try:
                await stub(channel).HealthCheck(
                    empty_pb2.Empty(), timeout=10
                )
                seen["plain_grpc"] = "answered"
            except grpc.aio.AioRpcError as exc:
                seen["plain_grpc"] = exc.code()
        os.kill(os.getpid(), signal.SIGTERM)

    code = await asyncio.wait_for(serve(config, keys, servers=servers, started=probe), 60)
    assert code == 0
    assert seen["models"] == []
    assert seen["plain_http"] == "refused"
    assert seen["grpc_health"] in ("healthy", "degraded")
    assert seen["plain_grpc"] == grpc.StatusCode.UNAVAILABLE
