"""The `[server]` section: defaults, validation naming the key, the key file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moc_node.config import ConfigError as LoadError
from moc_node.config import build
from transports.config import ConfigError, ServerConfig, load_api_keys


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
]


@pytest.mark.parametrize(("table", "start"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_value_stops_the_start_with_a_message_naming_the_key(
    table: dict[str, Any], start: str
) -> None:
    with pytest.raises(LoadError) as caught:
        from_mapping(table)
    assert str(caught.value).startswith(start)


def test_keys_from_the_file_join_the_configured_ones_skipping_comments(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# ops team\nfile-key-1\n\n  file-key-2  \n", encoding="utf-8")
    config = ServerConfig(api_keys=("inline",), api_key_file=str(key_file))
    assert load_api_keys(config) == {"inline", "file-key-1", "file-key-2"}


def test_an_unreadable_key_file_is_refused_without_showing_contents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_api_keys(ServerConfig(api_key_file=str(tmp_path / "missing")))
    assert "server.api_key_file" in str(caught.value)


def test_an_empty_key_file_is_refused_rather_than_silently_opening_the_server(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_api_keys(ServerConfig(api_key_file=str(key_file)))
