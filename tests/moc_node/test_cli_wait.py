"""`moc-node <command> --wait SECONDS`: the CLI waits for a node that is starting (tenacity).

The node is real and starts after the CLI: the CLI's first tries are refused connections, then
503s from /ready while the node restores its models, then the command runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from pathlib import Path

import pytest

from moc_node.app import build_runtime
from moc_node.cli import main
from tests.moc_node.conftest import catalog_of, make_config
from tests.support import wait_for
from tests.transports.conftest import FakeNode, server_config
from transports.http import HttpServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_status_with_wait_reaches_a_node_that_starts_after_it(
    tmp_path: Path,
    model_root: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO, logger="moc_node.cli")
    port = free_port()
    argv = ["status", "--wait", "60", "--url", f"http://127.0.0.1:{port}"]
    cli = asyncio.get_running_loop().run_in_executor(None, main, argv)
    await wait_for(lambda: "not ready" in caplog.text, 10, "the CLI's first refused try")
    assert not cli.done()

    config = make_config(tmp_path, model_root, catalog=catalog_of(model_root, "a"))
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, rest_port=port))
    runtime = build_runtime(config)
    http = HttpServer(runtime.node, config.server)
    try:
        await http.start()  # the port answers /ready 503 until the models are restored
        await runtime.node.start()
        assert await asyncio.wait_for(cli, 60) == 0
    finally:
        await http.stop()
        await runtime.close()
    out = capsys.readouterr().out
    assert "healthy" in out and "cpu" in out


async def test_a_wait_that_runs_out_ends_with_one_error_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = await asyncio.to_thread(main, ["models", "--wait", "0.5", "--url", url])
    assert code == 1
    assert time.monotonic() - started < 5
    out = capsys.readouterr().out
    assert "not ready after 0.5 s" in out and "cannot reach" in out


async def test_a_refusal_other_than_not_ready_ends_the_wait_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    http = HttpServer(FakeNode(), server_config(api_keys=("right",)))
    await http.start()
    try:
        started = time.monotonic()
        argv = ["status", "--wait", "60", "--api-key", "wrong"]
        code = await asyncio.to_thread(main, [*argv, "--url", f"http://127.0.0.1:{http.port}"])
    finally:
        await http.stop()
    assert code == 1
    assert time.monotonic() - started < 10
    assert "HTTP 401" in capsys.readouterr().out
