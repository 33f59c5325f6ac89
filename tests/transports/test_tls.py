"""The HTTP front over TLS: the official `openai` client through a verifying client, mutual TLS,
plain text refused, and the connection guard (address cap, head deadline) below the handshake.

A CA, a server certificate for 127.0.0.1 and a client CA with one client certificate are made
with trustme once per session; the servers are real `HttpServer`s on loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import httpx2
import openai
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support import wait_for
from tests.transports.real_node import (  # noqa: F401  (fixtures)
    RealNode,
    StartNode,
    start_node_fixture,
    tiny_models_fixture,
)
from transports.http import HttpServer
from transports.http_guard import HEADER_TIMEOUT, TLS_HANDSHAKE, TOO_MANY
from transports.metrics import HTTP_CONNECTIONS_REFUSED
from transports.tls import TlsMaterial, grpc_credentials, ssl_context

from .conftest import FakeNode, server_config


@pytest.fixture(scope="session")
def server_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def client_ca() -> trustme.CA:
    return trustme.CA()


def material(ca: trustme.CA, client_ca: trustme.CA | None = None) -> TlsMaterial:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return TlsMaterial(
        cert_chain=b"".join(blob.bytes() for blob in cert.cert_chain_pems),
        key=cert.private_key_pem.bytes(),
        client_ca=None if client_ca is None else client_ca.cert_pem.bytes(),
    )


def client_context(ca: trustme.CA, cert_from: trustme.CA | None = None) -> ssl.SSLContext:
    """A client context trusting `ca`, presenting a certificate issued by `cert_from` if given."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert_from is not None:
        cert_from.issue_cert("agent@example.com").configure_cert(context)
    return context


def refused(reason: str) -> float:
    """How many HTTP connections were refused for `reason` so far."""
    return float(HTTP_CONNECTIONS_REFUSED.labels(reason=reason)._value.get())


StartHttps = Callable[..., Awaitable[HttpServer]]


@pytest.fixture
async def start_https() -> AsyncIterator[StartHttps]:
    """Start HTTPS servers for a node with config overrides; stop them all at teardown."""
    servers: list[HttpServer] = []

    async def start(node: Any, tls: TlsMaterial, **overrides: Any) -> HttpServer:
        server = HttpServer(node, server_config(**overrides), ssl_context=ssl_context(tls))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def openai_client(port: int, verify: ssl.SSLContext) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        http_client=httpx2.AsyncClient(verify=verify),
    )


async def test_the_openai_client_completes_over_tls_verifying_the_server_certificate(
    start_https: StartHttps, server_ca: trustme.CA
) -> None:
    server = await start_https(FakeNode(), material(server_ca))
    async with openai_client(server.port, client_context(server_ca)) as client:
        done = await client.completions.create(model="tiny", prompt="say hi", max_tokens=3)
        assert done.choices[0].text == "Hello, world"
        stream = await client.completions.create(
            model="tiny", prompt="say hi", max_tokens=3, stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].text for c in chunks) == "Hello, world"


async def test_a_client_that_does_not_trust_the_ca_refuses_the_server(
    start_https: StartHttps, server_ca: trustme.CA
) -> None:
    server = await start_https(FakeNode(), material(server_ca))
    async with openai_client(server.port, client_context(trustme.CA())) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.models.list()


async def test_mutual_tls_serves_a_client_certificate_signed_by_the_client_ca_only(
    start_https: StartHttps, server_ca: trustme.CA, client_ca: trustme.CA
) -> None:
    server = await start_https(FakeNode(), material(server_ca, client_ca))
    before = refused(TLS_HANDSHAKE)
    async with openai_client(server.port, client_context(server_ca, client_ca)) as good:
        assert {m.id for m in (await good.models.list()).data} == {"tiny", "small", "huge"}
    for cert_from in (None, trustme.CA()):  # no certificate; one from a CA not trusted
        async with openai_client(server.port, client_context(server_ca, cert_from)) as bad:
            with pytest.raises(openai.APIConnectionError):
                await bad.models.list()
    await wait_for(lambda: refused(TLS_HANDSHAKE) >= before + 2, 5, "two refused handshakes")


def plain_request(port: int) -> bytes:
    """Send a plain-text HTTP request; return all the server sent before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


async def test_a_plain_text_request_to_the_tls_port_is_closed_unanswered_and_counted(
    start_https: StartHttps, server_ca: trustme.CA
) -> None:
    server = await start_https(FakeNode(), material(server_ca))
    before = refused(TLS_HANDSHAKE)
    received = await asyncio.to_thread(plain_request, server.port)
    assert not received.startswith(b"HTTP/")
    await wait_for(lambda: refused(TLS_HANDSHAKE) == before + 1, 5, "the refusal counted")
    assert server.open_connections("127.0.0.1") == 0


async def test_the_per_address_cap_counts_tls_connections_and_frees_their_slots(
    start_https: StartHttps, server_ca: trustme.CA
) -> None:
    server = await start_https(
        FakeNode(), material(server_ca), max_connections_per_ip=1
    )
    context = client_context(server_ca)
    before = refused(TOO_MANY)
    _, first = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    await wait_for(lambda: server.open_connections("127.0.0.1") == 1, 5, "the first admitted")
    reader, _ = await asyncio.open_connection("127.0.0.1", server.port)  # over the cap
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert refused(TOO_MANY) == before + 1
    first.close()
    await wait_for(lambda: server.open_connections("127.0.0.1") == 0, 5, "the slot freed")
    _, again = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    await wait_for(lambda: server.open_connections("127.0.0.1") == 1, 5, "a new one admitted")
    again.close()


@pytest.mark.parametrize("handshake", [False, True], ids=["stalled-handshake", "stalled-head"])
async def test_a_connection_that_stalls_its_handshake_or_its_head_is_closed_at_the_deadline(
    start_https: StartHttps, server_ca: trustme.CA, handshake: bool
) -> None:
    server = await start_https(
        FakeNode(), material(server_ca), header_read_timeout_s=0.3
    )
    before = refused(HEADER_TIMEOUT)
    context = client_context(server_ca) if handshake else None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=context)
    # Over TLS the close may come as a reset under the TLS layer: closed either way.
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    await wait_for(lambda: refused(HEADER_TIMEOUT) == before + 1, 5, "the deadline counted")
    await wait_for(lambda: server.open_connections("127.0.0.1") == 0, 5, "the slot freed")
    writer.close()


async def test_a_real_node_answers_the_openai_client_over_tls(
    start_node: StartNode, start_https: StartHttps, server_ca: trustme.CA
) -> None:
    served: RealNode = await start_node()
    server = await start_https(served.node, material(server_ca))
    async with openai_client(server.port, client_context(server_ca)) as client:
        done = await client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert done.usage is not None and done.usage.completion_tokens >= 1


@pytest.fixture
async def grpc_health_over_tls(
    server_ca: trustme.CA, client_ca: trustme.CA
) -> AsyncIterator[int]:
    """A grpc.aio server with the standard health service on `grpc_credentials` (mutual TLS)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc_credentials(material(server_ca, client_ca)))
    await server.start()
    yield port
    await server.stop(None)


async def test_grpc_credentials_serve_a_secure_channel_with_a_client_certificate_only(
    grpc_health_over_tls: int, server_ca: trustme.CA, client_ca: trustme.CA
) -> None:
    async def check(credentials: grpc.ChannelCredentials | None) -> Any:
        target = f"127.0.0.1:{grpc_health_over_tls}"
        options = [("grpc.ssl_target_name_override", "localhost")]
        channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options)
        )
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    issued = client_ca.issue_cert("agent@example.com")
    good = grpc.ssl_channel_credentials(
        root_certificates=server_ca.cert_pem.bytes(),
        private_key=issued.private_key_pem.bytes(),
        certificate_chain=issued.cert_chain_pems[0].bytes(),
    )
    assert (await check(good)).status == health_pb2.HealthCheckResponse.SERVING
    no_cert = grpc.ssl_channel_credentials(root_certificates=server_ca.cert_pem.bytes())
    for refused_credentials in (no_cert, None):  # no client certificate; plain text
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await check(refused_credentials)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
