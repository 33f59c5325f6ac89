"""The shipped unit file and example config are valid."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moc_node.config import load_config

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / "moc-node.service")
    return parser


def test_the_unit_is_a_notify_service_with_a_watchdog_and_reload() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert "HUP" in service["ExecReload"]
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "moc-node"
    assert service["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    text = (SYSTEMD / "moc-node.service").read_text()
    moc_node = Path(sys.executable).parent / "moc-node"
    local = tmp_path / "moc-node.service"
    local.write_text(text.replace("/opt/moc-node/.venv/bin/moc-node", str(moc_node)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "moc-node.service" not in result.stderr  # no warnings about our unit


def test_the_example_config_loads() -> None:
    config = load_config(SYSTEMD / "config.toml", env={})
    assert config.node.state_dir == "/var/lib/moc-node"
    assert config.server.api_key_file == "/etc/moc-node/api-keys"
