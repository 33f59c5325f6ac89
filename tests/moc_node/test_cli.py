"""The client commands of `moc-node` against a real node over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moc_node.app import Runtime, build_runtime
from moc_node.cli import main
from tests.moc_node.conftest import catalog_of, make_config
from transports.http import HttpServer


@pytest.fixture
async def served(tmp_path: Path, model_root: Path) -> AsyncIterator[tuple[Runtime, str]]:
    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, rest_port=0))
    runtime = build_runtime(config)
    await runtime.node.start()
    http = HttpServer(runtime.node, config.server)
    await http.start()
    yield runtime, f"http://127.0.0.1:{http.port}"
    await http.stop()
    await runtime.close()


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(argv))
    return code, capsys.readouterr().out


async def test_the_client_commands_drive_a_node(
    served: tuple[Runtime, str], model_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime, url = served
    code, out = await run_cli(capsys, "load", "b", "--path", str(model_root / "b.gguf"), "--url", url)
    assert code == 0 and "loaded" in out
    code, out = await run_cli(capsys, "infer", "a", "hello", "--max-tokens", "4", "--url", url)
    assert code == 0 and out.strip()
    code, out = await run_cli(capsys, "models", "--url", url)
    assert code == 0 and "loaded" in out and "b" in out
    code, out = await run_cli(capsys, "status", "--url", url)
    assert code == 0 and "healthy" in out and "cpu" in out
    code, out = await run_cli(capsys, "cluster", "--url", url)
    assert code == 0 and "test-node" in out and "single node" in out
    code, out = await run_cli(capsys, "top", "--iterations", "2", "--interval", "0.05", "--url", url)
    assert code == 0 and "test-node" in out
    code, out = await run_cli(capsys, "unload", "b", "--url", url)
    assert code == 0
    assert {m.name: m.state for m in runtime.node.models()}["a"] == "loaded"
    assert "b" not in {m.name for m in runtime.node.models()}


async def test_errors_are_one_clear_line(
    served: tuple[Runtime, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = served
    code, out = await run_cli(capsys, "unload", "nope", "--url", url)
    assert code == 1 and "404" in out and "not loaded" in out
    code, out = await run_cli(capsys, "status", "--url", "http://127.0.0.1:1")
    assert code == 1 and "cannot reach" in out
