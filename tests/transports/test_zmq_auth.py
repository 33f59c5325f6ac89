"""Who may talk to the legacy ZeroMQ port: allow-list, CURVE, the request's key, loopback.

Real servers and real REQ clients (libzmq's own handshake and ZAP calls); the ZAP decision and
the bind rule are also checked as pure functions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from actors.types import ComponentHealth, HealthReport
from moc_node.config import load_config
from tests.support import wait_for
from transports.config import ZmqAuth
from transports.zmq_auth import ZapRequest, address_allowed, bind_host, zap_verdict
from transports.zmq_legacy import ZmqServer

from .conftest import FakeNode, legacy_call, metric, request

KEY = "s3cret-key"
LOAD = request("load_model", {"model_name": "custom", "model_path": "/models/custom.gguf"})


class PathHealthNode(FakeNode):
    """A node whose health details name files, as the real node's state store does."""

    def health(self) -> HealthReport:
        return HealthReport(
            "healthy",
            {"state_store": ComponentHealth("healthy", "/var/lib/moc-node/state.db")},
        )


def networks(*cidrs: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


# ---- the decisions (pure) ----

VERDICTS: list[tuple[str, ZmqAuth, ZapRequest, str]] = [
    (
        "an allowed address with no key",
        ZmqAuth(allow_from=networks("10.1.0.0/16")),
        ZapRequest(b"1", "10.1.2.3", "NULL", None),
        "ok",
    ),
    (
        "an address outside the list",
        ZmqAuth(allow_from=networks("10.1.0.0/16")),
        ZapRequest(b"1", "10.2.0.1", "NULL", None),
        "address",
    ),
    (
        "an IPv4-mapped IPv6 address inside the list",
        ZmqAuth(allow_from=networks("192.168.1.7")),
        ZapRequest(b"1", "::ffff:192.168.1.7", "NULL", None),
        "ok",
    ),
    (
        "a plain client on a CURVE port",
        ZmqAuth(curve_public_key=b"p" * 40, curve_secret_key=b"s" * 40),
        ZapRequest(b"1", "10.0.0.1", "NULL", None),
        "mechanism",
    ),
    (
        "any CURVE client when no client keys are listed",
        ZmqAuth(curve_public_key=b"p" * 40, curve_secret_key=b"s" * 40),
        ZapRequest(b"1", "10.0.0.1", "CURVE", b"c" * 40),
        "ok",
    ),
    (
        "a CURVE client whose key is not listed",
        ZmqAuth(
            curve_public_key=b"p" * 40,
            curve_secret_key=b"s" * 40,
            curve_client_keys=frozenset({b"k" * 40}),
        ),
        ZapRequest(b"1", "10.0.0.1", "CURVE", b"c" * 40),
        "curve_key",
    ),
]


@pytest.mark.parametrize(
    ("auth", "req", "reason"), [v[1:] for v in VERDICTS], ids=[v[0] for v in VERDICTS]
)
def test_the_zap_verdict_follows_the_allow_list_and_the_client_keys(
    auth: ZmqAuth, req: ZapRequest, reason: str
) -> None:
    verdict = zap_verdict(auth, req)
    assert verdict.reason == reason
    assert verdict.allowed == (reason == "ok")


def test_an_address_that_is_not_an_ip_is_never_in_an_allow_list() -> None:
    assert not address_allowed("not-an-ip", networks("0.0.0.0/0"))
    assert address_allowed("not-an-ip", ())


BINDS: list[tuple[str, str, bool, bool, str]] = [
    ("no keys: the configured host", "0.0.0.0", False, False, "0.0.0.0"),
    ("keys without zmq auth: loopback", "0.0.0.0", True, False, "127.0.0.1"),
    ("keys without zmq auth on IPv6: loopback", "::", True, False, "::1"),
    ("keys without zmq auth on a host name: loopback", "gpu-01", True, False, "127.0.0.1"),
    ("keys with zmq auth: the configured host", "0.0.0.0", True, True, "0.0.0.0"),
    ("keys on loopback already", "127.0.0.1", True, False, "127.0.0.1"),
]


@pytest.mark.parametrize(
    ("host", "keys", "zmq_auth", "bound"), [b[1:] for b in BINDS], ids=[b[0] for b in BINDS]
)
def test_the_zmq_front_binds_loopback_when_keys_are_set_and_nothing_guards_it(
    host: str, keys: bool, zmq_auth: bool, bound: str
) -> None:
    assert bind_host(host, keys_configured=keys, zmq_auth_configured=zmq_auth) == bound


# ---- over real sockets ----


async def call(ctx: zmq.Context[Any], server: ZmqServer, message: Any) -> Any:
    return await asyncio.to_thread(legacy_call, ctx, server.endpoint, message)


async def test_with_api_keys_and_no_zmq_auth_the_port_is_on_loopback_only_with_a_warning(
    node: FakeNode,
    start_zmq: Any,
    zmq_context: zmq.Context[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="transports.zmq_legacy"):
        server: ZmqServer = await start_zmq(node, host="0.0.0.0", api_keys=(KEY,))

    assert server.endpoint.startswith("tcp://127.0.0.1:")
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "127.0.0.1" in warning.getMessage()
    assert "zmq_allow_from" in warning.getMessage()
    # A legacy agent on the same host still works, key or not.
    assert (await call(zmq_context, server, LOAD))["success"] is True


async def test_an_allow_listed_host_is_served_without_a_key(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, api_keys=(KEY,), zmq_allow_from=("127.0.0.0/8",))

    reply = await call(zmq_context, server, LOAD)

    assert reply["success"] is True


def connect_and_send(ctx: zmq.Context[Any], endpoint: str, message: Any, **options: Any) -> Any:
    """Open a REQ socket with `options`, send `message`; return the socket (caller closes)."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    sock.send_json(message)
    return sock


async def test_a_host_outside_the_allow_list_is_refused_at_connect_and_counted(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, api_keys=(KEY,), zmq_allow_from=("10.0.0.0/8",))
    before = metric("moc_zmq_auth_denied_total", reason="address")

    sock = connect_and_send(zmq_context, server.endpoint, LOAD)
    try:
        await wait_for(
            lambda: metric("moc_zmq_auth_denied_total", reason="address") > before, timeout=5.0
        )
        assert not sock.poll(100)  # no reply: the request never reached the server
    finally:
        sock.close()
    assert "custom" not in {m.name for m in node.models() if m.state == "loaded"}


@pytest.fixture
def curve_files(tmp_path: Path) -> dict[str, Any]:
    """A server certificate, two client key pairs and a file allowing only the first client."""
    _, server_secret = zmq.auth.create_certificates(tmp_path, "server")
    server_public, _ = zmq.auth.load_certificate(server_secret)
    allowed = zmq.curve_keypair()
    stranger = zmq.curve_keypair()
    clients = tmp_path / "clients"
    clients.write_text(f"# agents\n{allowed[0].decode()}\n", encoding="utf-8")
    return {
        "secret_file": str(server_secret),
        "server_public": server_public,
        "clients_file": str(clients),
        "allowed": allowed,
        "stranger": stranger,
    }


def curve_options(server_public: bytes, pair: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "CURVE_SERVERKEY": server_public,
        "CURVE_PUBLICKEY": pair[0],
        "CURVE_SECRETKEY": pair[1],
    }


def handshake_drops() -> float:
    """Connections libzmq dropped in the handshake. A mechanism mismatch reads as a protocol
    error, or as a connection closed midway when the client saw the mismatch first."""
    return sum(
        metric("moc_zmq_connections_dropped_total", reason=reason)
        for reason in ("protocol_error", "handshake_failed")
    )


async def test_a_curve_client_with_an_allowed_key_is_served_and_others_are_refused(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any], curve_files: dict[str, Any]
) -> None:
    server: ZmqServer = await start_zmq(
        node,
        api_keys=(KEY,),
        zmq_curve_secret_key_file=curve_files["secret_file"],
        zmq_curve_client_keys_file=curve_files["clients_file"],
    )
    public = curve_files["server_public"]

    def exchange() -> Any:
        options = curve_options(public, curve_files["allowed"])
        sock = connect_and_send(zmq_context, server.endpoint, LOAD, RCVTIMEO=10_000, **options)
        try:
            return sock.recv_json()
        finally:
            sock.close()

    assert (await asyncio.to_thread(exchange))["success"] is True

    denied = metric("moc_zmq_auth_denied_total", reason="curve_key")
    stranger = connect_and_send(
        zmq_context, server.endpoint, LOAD, **curve_options(public, curve_files["stranger"])
    )
    dropped = handshake_drops()
    plain = connect_and_send(zmq_context, server.endpoint, request("health"))
    try:
        await wait_for(
            lambda: metric("moc_zmq_auth_denied_total", reason="curve_key") > denied, timeout=5.0
        )
        # A plain legacy client cannot even agree on the mechanism: libzmq drops it, counted.
        await wait_for(lambda: handshake_drops() > dropped, timeout=5.0)
        assert not stranger.poll(100)
        assert not plain.poll(0)
    finally:
        stranger.close()
        plain.close()


async def test_any_client_knowing_the_server_key_is_served_when_no_client_keys_are_listed(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any], curve_files: dict[str, Any]
) -> None:
    server: ZmqServer = await start_zmq(
        node, api_keys=(KEY,), zmq_curve_secret_key_file=curve_files["secret_file"]
    )

    def exchange() -> Any:
        options = curve_options(curve_files["server_public"], curve_files["stranger"])
        sock = connect_and_send(zmq_context, server.endpoint, LOAD, RCVTIMEO=10_000, **options)
        try:
            return sock.recv_json()
        finally:
            sock.close()

    assert (await asyncio.to_thread(exchange))["success"] is True


async def test_with_a_required_key_a_request_without_or_with_a_wrong_key_is_unauthorized(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, api_keys=(KEY,), zmq_require_api_key=True)
    before = metric("moc_zmq_requests_total", action="load_model", outcome="unauthorized")

    missing = await call(zmq_context, server, LOAD)
    wrong = await call(zmq_context, server, {**LOAD, "api_key": "guess"})
    not_a_string = await call(zmq_context, server, {**LOAD, "api_key": ["guess"]})
    surrogate = await call(zmq_context, server, {**LOAD, "api_key": "s3cret-\ud800"})

    for reply in (missing, wrong, not_a_string, surrogate):
        assert reply["success"] is False
        assert reply["error_code"] == "unauthorized"
        assert reply["error"].startswith("unauthorized: ")
        assert KEY not in json.dumps(reply)
        assert reply["request_id"] == "r-1"
    assert "api_key" in missing["error"]
    after = metric("moc_zmq_requests_total", action="load_model", outcome="unauthorized")
    assert after == before + 4
    assert "custom" not in {m.name for m in node.models() if m.state == "loaded"}

    good = await call(zmq_context, server, {**LOAD, "api_key": KEY})
    assert good["success"] is True


async def test_without_a_required_key_a_wrong_key_is_still_refused_and_none_is_served(
    node: FakeNode, start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(node, api_keys=(KEY,))

    wrong = await call(zmq_context, server, {**LOAD, "api_key": "guess"})
    keyless = await call(zmq_context, server, LOAD)

    assert wrong["error_code"] == "unauthorized"
    assert keyless["success"] is True


async def test_health_stays_open_but_shows_no_detail_without_a_key(
    start_zmq: Any, zmq_context: zmq.Context[Any]
) -> None:
    server: ZmqServer = await start_zmq(PathHealthNode(), api_keys=(KEY,), zmq_require_api_key=True)

    open_health = await call(zmq_context, server, request("health"))
    keyed = await call(zmq_context, server, {**request("health"), "api_key": KEY})

    assert open_health["success"] is True
    assert open_health["result"]["components"] == {"state_store": {"status": "healthy"}}
    assert "/var/lib" not in json.dumps(open_health)
    detail = keyed["result"]["components"]["state_store"]["detail"]
    assert detail == "/var/lib/moc-node/state.db"


async def test_a_peer_that_stalls_in_the_handshake_is_dropped_after_the_timeout_and_counted(
    node: FakeNode, start_zmq: Any
) -> None:
    server: ZmqServer = await start_zmq(node, zmq_handshake_timeout_s=0.3)
    before = metric("moc_zmq_connections_dropped_total", reason="handshake_failed")

    def stall() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(b"\xff\x00\x00")  # the first bytes of a ZMTP greeting, then nothing
            data = b""
            while chunk := raw.recv(4096):  # libzmq's greeting, then EOF when it gives up
                data += chunk
            return data

    await asyncio.wait_for(asyncio.to_thread(stall), 10)
    await wait_for(
        lambda: metric("moc_zmq_connections_dropped_total", reason="handshake_failed") > before,
        timeout=5.0,
    )


async def test_the_shipped_example_config_keeps_the_zmq_port_off_the_network(
    node: FakeNode, tmp_path: Path, zmq_context: zmq.Context[Any]
) -> None:
    example = load_config(Path(__file__).parents[2] / "systemd" / "config.toml", env={})
    key_file = tmp_path / "api-keys"
    key_file.write_text(KEY + "\n", encoding="utf-8")
    config = dataclasses.replace(
        example.server, zmq_port=0, rest_port=0, api_key_file=str(key_file)
    )
    assert config.host == "0.0.0.0"

    async with ZmqServer(node, config) as server:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        assert (await call(zmq_context, server, request("health")))["success"] is True
