"""The client commands of `moc-node` against a real node over HTTP, and `moc-node run` refusing
a config that cannot start."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moc_node.app import Runtime, build_runtime
from moc_node.cli import main, slots_table
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
    assert "slots busy" in out and "0/1" in out  # model a: one slot, idle
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


# ---- `moc-node run` refusing a config that cannot start --------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclasses.dataclass
class Refusal:
    """A config `moc-node run` must refuse, and the key its one line must name."""

    key: str
    toml: str = ""  # sections after the base config
    server: str = ""  # lines added to its [server] section
    key_file: str | None = None  # written to <tmp>/cluster.key
    occupy: str | None = None  # "rest", "zmq" or "grpc": a socket of the test's own holds that port
    # A bind failure comes after the runtime is built, which logs; a preflight one before.
    only_line: bool = True


REFUSALS: dict[str, Refusal] = {
    "bad-cluster-key-file": Refusal(
        "cluster.key_file",
        '[cluster]\nenabled = true\nprofile = "local"\nkey_file = "{tmp}/cluster.key"\n',
        key_file="this line is neither hex nor base64\n",
    ),
    "missing-api-key-file": Refusal(
        "server.api_key_file", server='api_key_file = "{tmp}/no-such-keys"\n'
    ),
    "seeds-without-enabled": Refusal("cluster.seeds", '[cluster]\nseeds = ["10.0.0.1:7946"]\n'),
    "http-port-in-use": Refusal("server.rest_port", occupy="rest", only_line=False),
    "zmq-port-in-use": Refusal("server.zmq_port", occupy="zmq", only_line=False),
    "grpc-port-in-use": Refusal("server.grpc_port", occupy="grpc", only_line=False),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_run_refuses_a_config_that_cannot_start_with_exit_2_and_one_line(
    tmp_path: Path, case: Refusal
) -> None:
    ports = {"rest": free_port(), "zmq": free_port(), "grpc": free_port()}
    holder = socket.socket()
    if case.occupy:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports[case.occupy] = holder.getsockname()[1]
    if case.key_file is not None:
        (tmp_path / "cluster.key").write_text(case.key_file)
    (tmp_path / "models").mkdir()
    config = tmp_path / "moc.toml"
    config.write_text(
        f"""
[node]
state_dir = "{tmp_path / "state"}"
model_dirs = ["{tmp_path / "models"}"]
[server]
host = "127.0.0.1"
rest_port = {ports["rest"]}
zmq_port = {ports["zmq"]}
grpc_port = {ports["grpc"]}
{case.server.replace("{tmp}", str(tmp_path))}
[resources]
devices = "cpu"
[[models.catalog]]
name = "m"
path = "{tmp_path / "models" / "m.gguf"}"
"""
        + case.toml.replace("{tmp}", str(tmp_path))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOC_")}
    started = time.monotonic()
    with holder:
        done = subprocess.run(
            [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,  # the old node kept running with a missing api_key_file
        )
    elapsed = time.monotonic() - started
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("moc-node: config error: ")]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(errors) == 1 and errors[0] == lines[-1], done.stderr
    assert errors[0].startswith(f"moc-node: config error: {case.key}: ")
    if case.only_line:
        # Each listener logs when it binds (INFO, on stderr): one line means none was bound.
        assert lines == errors
        assert not (tmp_path / "state").exists()  # refused before anything was written
    else:
        assert f"127.0.0.1:{ports[case.occupy or '']}: Address already in use" in errors[0]
    assert not any(connectable(port) for name, port in ports.items() if name != case.occupy)
    assert elapsed < 60, f"took {elapsed:.1f} s to refuse"


def test_an_error_an_actor_hands_back_to_its_caller_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import pykka

    from moc_node.cli import configure_logging

    class Refuses(pykka.ThreadingActor):
        def lookup(self, job_id: str) -> None:
            raise KeyError(f"no job {job_id}")  # a client's bad input, answered by the caller

    levels = {name: logging.getLogger(name).level for name in ("pykka", "aiohttp.server")}
    configure_logging("INFO")
    ref = Refuses.start()
    try:
        with caplog.at_level(logging.INFO), pytest.raises(KeyError):
            ref.proxy().lookup("nope").get(timeout=10)
    finally:
        ref.stop()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert not [r for r in caplog.records if r.name.startswith("pykka") and r.exc_info]


def test_the_slots_table_shows_busy_slots_and_what_waits_for_one() -> None:
    from rich.console import Console

    models = [
        {"name": "big", "state": "loaded", "slots": 8, "in_flight": 11, "queued": 0},
        {"name": "cold", "state": "loading", "slots": 4, "in_flight": 0, "queued": 2},
        {"name": "gone", "state": "available", "slots": None, "in_flight": 0, "queued": 0},
    ]
    console = Console(width=120, record=True)
    console.print(slots_table(models))
    rows = [line.split("│") for line in console.export_text().splitlines() if "│" in line]
    cells = {r[1].strip(): [c.strip() for c in r[2:-1]] for r in rows if r[1].strip()}
    assert cells["big"] == ["loaded", "8/8", "3", "11"]  # 3 past the slots wait in the worker
    assert cells["cold"] == ["loading", "0/4", "2", "0"]  # 2 wait for the load
    assert "gone" not in cells
