"""The sd_notify protocol, spoken directly (one datagram per message; no dependency needed).

systemd passes `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace) and, with
`WatchdogSec=`, `WATCHDOG_USEC` / `WATCHDOG_PID`. Without them every call is a no-op, so the same
code runs under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Send state changes to the service manager, if there is one."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *lines: str) -> None:
        """Send `KEY=value` lines as one message; failures are logged, never raised."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 to order it against READY=1.
        usec = int(_monotonic_usec())
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining requests and unloading models")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _monotonic_usec() -> float:
    import time

    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """Return the watchdog interval systemd asked for, or None without one (or not for us)."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None


async def watchdog(
    notifier: Notifier,
    alive: Callable[[], Awaitable[bool]],
    interval: float,
) -> None:
    """Send WATCHDOG=1 every `interval` seconds while `alive()` answers True in time.

    Running on the event loop, a stalled loop sends nothing; `alive` checks the actors. A check
    that does not answer within the interval counts as a failure, so systemd restarts a node
    whose actors hang.
    """
    while True:
        try:
            healthy = await asyncio.wait_for(alive(), timeout=interval)
        except (TimeoutError, Exception) as exc:  # any failure: skip this ping
            log.warning("watchdog check failed: %r", exc)
            healthy = False
        if healthy:
            notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)
