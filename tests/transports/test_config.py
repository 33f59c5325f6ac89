"""The `[server]` section: defaults, validation naming the key, the key file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from moc_node.config import ConfigError as FileConfigError
from moc_node.config import build
from transports.config import ServerConfig, ServerConfigError, load_api_keys, load_zmq_auth


def from_mapping(table: dict[str, Any]) -> ServerConfig:
    config: ServerConfig = build(ServerConfig, table, "server")
    return config


def test_the_defaults_keep_the_legacy_ports_and_worker_count() -> None:
    config = ServerConfig()
    assert (config.zmq_port, config.rest_port, config.max_workers) == (7211, 8008, 16)
    assert config.open_paths == ("/health", "/metrics")
    assert not config.auth_configured


def test_a_toml_table_becomes_a_config_with_lists_as_tuples() -> None:
    config = from_mapping({"host": "0.0.0.0", "api_keys": ["a", "b"], "request_timeout_s": 5})
    assert config.host == "0.0.0.0"
    assert config.api_keys == ("a", "b")
    assert config.request_timeout_s == 5.0
    assert config.auth_configured


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown key", {"zmq_prot": 1}, "server.zmq_prot: unknown key"),
    ("port out of range", {"rest_port": 70000}, "server.rest_port:"),
    ("port a string", {"zmq_port": "7211"}, "server.zmq_port: expected an integer"),
    ("port a bool", {"zmq_port": True}, "server.zmq_port: expected an integer"),
    ("zero workers", {"max_workers": 0}, "server.max_workers:"),
    ("negative timeout", {"request_timeout_s": -1}, "server.request_timeout_s:"),
    ("keys not a list", {"api_keys": "secret"}, "server.api_keys:"),
    ("empty key", {"api_keys": [""]}, "server.api_keys:"),
    ("relative open path", {"open_paths": ["health"]}, "server.open_paths:"),
    (
        "hard limit below soft",
        {"max_frame_bytes": 100, "zmq_max_msg_bytes": 10},
        "server.zmq_max_msg_bytes:",
    ),
    ("zero header timeout", {"header_read_timeout_s": 0}, "server.header_read_timeout_s:"),
    ("infinite keep-alive", {"keepalive_timeout_s": float("inf")}, "server.keepalive_timeout_s:"),
    ("negative connection cap", {"max_connections_per_ip": -1}, "server.max_connections_per_ip:"),
    ("zero handshake timeout", {"zmq_handshake_timeout_s": 0}, "server.zmq_handshake_timeout_s:"),
    ("allow entry not an address", {"zmq_allow_from": ["gpu-01"]}, "server.zmq_allow_from:"),
    ("allow entry a bad network", {"zmq_allow_from": ["10.0.0.0/33"]}, "server.zmq_allow_from:"),
    (
        "client keys without a server key",
        {"zmq_curve_client_keys_file": "/etc/moc-node/clients"},
        "server.zmq_curve_client_keys_file:",
    ),
    ("required key without keys", {"zmq_require_api_key": True}, "server.zmq_require_api_key:"),
]


@pytest.mark.parametrize(("table", "start"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_value_stops_the_start_with_a_message_naming_the_key(
    table: dict[str, Any], start: str
) -> None:
    with pytest.raises(FileConfigError) as caught:
        from_mapping(table)
    assert str(caught.value).startswith(start)


def test_keys_from_the_file_join_the_configured_ones_skipping_comments(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# ops team\nfile-key-1\n\n  file-key-2  \n", encoding="utf-8")
    config = ServerConfig(api_keys=("inline",), api_key_file=str(key_file))
    assert load_api_keys(config) == {"inline", "file-key-1", "file-key-2"}


def test_an_unreadable_key_file_is_refused_without_showing_contents(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError) as caught:
        load_api_keys(ServerConfig(api_key_file=str(tmp_path / "missing")))
    assert "server.api_key_file" in str(caught.value)


def test_an_empty_key_file_is_refused_rather_than_silently_opening_the_server(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(ServerConfigError):
        load_api_keys(ServerConfig(api_key_file=str(key_file)))


def test_the_zmq_auth_reads_an_allow_list_a_server_certificate_and_client_keys(
    tmp_path: Path,
) -> None:
    _, secret_file = zmq.auth.create_certificates(tmp_path, "server")
    public, secret = zmq.auth.load_certificate(secret_file)
    client_public, _ = zmq.curve_keypair()
    clients = tmp_path / "clients"
    clients.write_text(f"# one agent\n\n{client_public.decode()}\n", encoding="utf-8")
    config = ServerConfig(
        zmq_allow_from=("10.1.0.0/16", "::1"),
        zmq_curve_secret_key_file=str(secret_file),
        zmq_curve_client_keys_file=str(clients),
    )

    auth = load_zmq_auth(config)

    assert [str(n) for n in auth.allow_from] == ["10.1.0.0/16", "::1/128"]
    assert (auth.curve_public_key, auth.curve_secret_key) == (public, secret)
    assert auth.curve_client_keys == frozenset({client_public})
    assert auth.needs_zap


def test_a_bare_z85_secret_key_file_gives_its_public_key(tmp_path: Path) -> None:
    public, secret = zmq.curve_keypair()
    key_file = tmp_path / "server.secret"
    key_file.write_text(secret.decode() + "\n", encoding="utf-8")

    auth = load_zmq_auth(ServerConfig(zmq_curve_secret_key_file=str(key_file)))

    assert auth.curve_public_key == public
    assert auth.curve_client_keys is None


def test_without_zmq_auth_keys_nothing_is_read_and_no_zap_is_needed() -> None:
    assert not load_zmq_auth(ServerConfig()).needs_zap


BAD_FILES: list[tuple[str, str, str, str]] = [
    # (id, server file text or "missing", clients file text or "", key the error names)
    ("missing server key file", "missing", "", "server.zmq_curve_secret_key_file:"),
    ("server file without a key", "# nothing\n", "", "server.zmq_curve_secret_key_file:"),
    ("public certificate only", "PUBLIC", "", "server.zmq_curve_secret_key_file:"),
    ("client line not a key", "SECRET", "not-a-key\n", "server.zmq_curve_client_keys_file:"),
    ("client file without keys", "SECRET", "# empty\n", "server.zmq_curve_client_keys_file:"),
]


@pytest.mark.parametrize(
    ("server", "clients", "names"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_a_bad_curve_key_file_is_refused_at_load_naming_the_key_not_the_secret(
    tmp_path: Path, server: str, clients: str, names: str
) -> None:
    public_file, secret_file = zmq.auth.create_certificates(tmp_path, "server")
    _, secret = zmq.auth.load_certificate(secret_file)
    server_file = tmp_path / "server-key"
    if server == "SECRET":
        server_file = Path(secret_file)
    elif server == "PUBLIC":
        server_file = Path(public_file)
    elif server != "missing":
        server_file.write_text(server, encoding="utf-8")
    clients_file = None
    if clients:
        clients_file = tmp_path / "clients"
        clients_file.write_text(clients, encoding="utf-8")
    config = ServerConfig(
        zmq_curve_secret_key_file=str(server_file),
        zmq_curve_client_keys_file=None if clients_file is None else str(clients_file),
    )

    with pytest.raises(ServerConfigError) as caught:
        load_zmq_auth(config)

    assert str(caught.value).startswith(names)
    assert secret is not None and secret.decode() not in str(caught.value)
