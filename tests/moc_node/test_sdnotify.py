"""sd_notify: the messages a node sends systemd, their order, and the watchdog."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.gguf_synth import write_preset
from moc_node.sdnotify import Notifier, watchdog
from tests.support import wait_for


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready("ok")  # a no-op


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    notifier.ready("serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_messages_reach_an_abstract_socket() -> None:
    name = f"moc-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier(env={"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(4096).startswith(b"STOPPING=1")


def test_the_watchdog_interval_is_for_our_pid_only() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "2000000"}).watchdog_interval == 2.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env=other).watchdog_interval is None


class Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__(env={})
        self.sent: list[tuple[float, str]] = []

    def notify(self, *lines: str) -> None:
        self.sent.append((time.monotonic(), "\n".join(lines)))


async def test_the_watchdog_pings_while_the_actors_answer() -> None:
    recorder = Recorder()

    async def alive() -> bool:
        return True

    task = asyncio.create_task(watchdog(recorder, alive, 0.02))
    await wait_for(lambda: len(recorder.sent) >= 3, 5, "three pings")
    task.cancel()
    assert {m for _, m in recorder.sent} == {"WATCHDOG=1"}


async def test_hung_actors_stop_the_watchdog_pings() -> None:
    recorder = Recorder()
    hang = asyncio.Event()
    checks = 0

    async def alive() -> bool:
        nonlocal checks
        checks += 1
        await hang.wait()  # the actors never answer
        return True

    task = asyncio.create_task(watchdog(recorder, alive, 0.02))
    await wait_for(lambda: checks >= 3, 5, "three checks timed out")  # none may have pinged
    task.cancel()
    assert recorder.sent == []


async def test_a_stalled_event_loop_sends_no_pings() -> None:
    recorder = Recorder()

    async def alive() -> bool:
        return True

    task = asyncio.create_task(watchdog(recorder, alive, 0.02))
    await wait_for(lambda: bool(recorder.sent), 5, "a first ping")
    stalled_from = time.monotonic()
    time.sleep(0.3)  # deliberately block the loop: this is the stall under test
    stalled_to = time.monotonic()
    await wait_for(lambda: recorder.sent[-1][0] >= stalled_to, 5, "a ping after the stall")
    task.cancel()
    assert not [t for t, _ in recorder.sent if stalled_from < t < stalled_to]


def test_a_node_under_systemd_notifies_in_order(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    models = tmp_path / "models"
    models.mkdir()
    write_preset(models / "t.gguf", "tiny")
    config = tmp_path / "moc.toml"
    config.write_text(
        f"""
[node]
state_dir = "{tmp_path / "state"}"
model_dirs = ["{models}"]
[server]
zmq_port = {free_port()}
rest_port = {free_port()}
grpc_port = 0
[resources]
devices = "cpu"
[[models.catalog]]
name = "t"
path = "{models / "t.gguf"}"
n_ctx = 128
preload = true
"""
    )
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moc_node.cli", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    received: list[str] = []

    def until(prefix: str) -> None:
        while not any(m.startswith(prefix) for m in received):
            received.append(sock.recv(4096).decode())

    try:
        until("READY=1")
        until("WATCHDOG=1")
        proc.send_signal(signal.SIGHUP)
        until("RELOADING=1")
        received.clear()
        until("READY=1")
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert received[-1].startswith("STOPPING=1")


def test_startup_messages_come_in_order(
    tmp_path: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    env = {
        **os.environ,
        "NOTIFY_SOCKET": path,
        "MOC_NODE__STATE_DIR": str(tmp_path / "state"),
        "MOC_SERVER__ZMQ_PORT": str(free_port()),
        "MOC_SERVER__REST_PORT": str(free_port()),
        "MOC_RESOURCES__DEVICES": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "moc_node.cli", "run"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        first = sock.recv(4096).decode()
        second = sock.recv(4096).decode()
        proc.send_signal(signal.SIGTERM)
        third = sock.recv(4096).decode()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert first == "STATUS=restoring models"
    assert second.startswith("READY=1\nSTATUS=ready: 1 model(s) loaded")  # the generated demo
    assert third.startswith("STOPPING=1")
