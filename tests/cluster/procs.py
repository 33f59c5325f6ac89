"""Run `python -m tests.cluster.demo` nodes as real child processes and follow their JSON reports.

Used by the multi-process tests, the network-namespace test and `bench/gossip.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class DemoProc:
    """One node process; `view` is its latest report, updated by a reader thread."""

    def __init__(self, name: str, args: Sequence[str] = (), prefix: Sequence[str] = ()) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.cluster.demo", "--name", name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            text=True,
        )
        self.cond = threading.Condition()
        self.ready: dict[str, Any] | None = None
        self.view: dict[str, Any] | None = None
        self.views: list[dict[str, Any]] = []
        self.left: dict[str, Any] | None = None
        self.other: list[str] = []
        self.eof = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            with self.cond:
                if not isinstance(obj, dict):
                    self.other.append(line.rstrip())
                elif obj.get("event") == "ready":
                    self.ready = obj
                elif obj.get("event") == "view":
                    self.view = obj
                    self.views.append(obj)
                elif obj.get("event") == "left":
                    self.left = obj
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    @property
    def addr(self) -> str:
        """Return the node's gossip host:port (after `wait_ready`)."""
        assert self.ready is not None
        return str(self.ready["addr"])

    def wait(self, pred: Callable[[DemoProc], bool], timeout: float) -> bool:
        """Block until `pred(self)` holds (re-checked on every report) or `timeout` passes."""
        with self.cond:
            return self.cond.wait_for(lambda: pred(self), timeout)

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for the ready line and return the bound address."""
        if not self.wait(lambda p: p.ready is not None or p.eof, timeout) or self.ready is None:
            raise AssertionError(f"{self.name} not ready: {self.diagnostics()}")
        return self.addr

    def states(self) -> dict[str, str]:
        """Return the latest member states reported."""
        with self.cond:
            return dict(self.view["members"]) if self.view else {}

    def send(self, command: str) -> None:
        """Write one command line to the node's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the node (no goodbye)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the node (end of stdin), killing it if it does not exit in time."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._thread.join(timeout)

    def diagnostics(self) -> str:
        """Return what the process printed besides JSON, for failure messages."""
        with self.cond:
            return f"rc={self.proc.poll()} view={self.view} other={self.other[-20:]}"


def all_see(procs: Sequence[DemoProc], expected: dict[str, str], timeout: float) -> bool:
    """Wait until every process reports exactly `expected` for the names it lists there."""

    def ok(p: DemoProc) -> bool:
        s = p.view["members"] if p.view else {}
        return all(s.get(n) == st for n, st in expected.items())

    deadline = time.monotonic() + timeout
    return all(p.wait(ok, max(0.0, deadline - time.monotonic())) for p in procs)


def poll_until(cond: Callable[[], bool], timeout: float, every: float = 0.02) -> bool:
    """Re-check `cond` every `every` seconds until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not cond():
        if time.monotonic() > deadline:
            return False
        tick.wait(every)
    return True


def acting(p: DemoProc) -> bool:
    """Return whether the process last reported acting as primary."""
    with p.cond:
        return bool(p.view and p.view["is_primary"])


def agreed_primary(group: Sequence[DemoProc], timeout: float) -> tuple[str, int]:
    """Wait until every process names the same primary and that one acts; return (name, term)."""
    found: list[tuple[str, int]] = []

    def ok() -> bool:
        named = set()
        for p in group:
            with p.cond:
                primary = p.view["primary"] if p.view else None
            named.add(tuple(primary) if primary else None)
        if len(named) != 1 or None in named:
            return False
        ((name, term),) = named  # type: ignore[misc]
        if not any(p.name == name and acting(p) for p in group):
            return False
        found[:] = [(str(name), int(term))]
        return True

    if not poll_until(ok, timeout):
        raise AssertionError([p.diagnostics() for p in group])
    return found[0]
