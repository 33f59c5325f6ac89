"""Run one cluster node alone in a process, for tests and benchmarks of real multi-process gossip.

    python -m tests.cluster.demo --name n1 --bind 127.0.0.1:0 --seed 127.0.0.1:7946 --profile local

It prints JSON lines on stdout: `{"event": "ready", "addr": "host:port", ...}` once bound, then
`{"event": "view", "t": <time.monotonic()>, "members": {name: state}, "primary": [name, term] |
null, "is_primary": bool, "term": int, "dropped": {...}, "windows": [[term, start, end], ...]}`
(the exact acting windows of this node's leases, monotonic clock) whenever any of those but the
drop counters changes, and
`{"event": "left", "ok": bool}` after a leave. CLOCK_MONOTONIC is system-wide, so a parent can
compare `t` with its own clock.

Commands on stdin, one per line: `join` (join the --seed nodes now; with --hold-join the node
waits for this), `leave` (graceful leave, then exit 0), `stop` (exit without a goodbye). End of
stdin stops the node too, so children never outlive their parent.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from typing import Any

from cluster.config import PROFILES
from cluster.election import MemoryTermStore
from cluster.keyring import Keyring, read_key_file
from cluster.meta import DeviceMeta, ModelMeta, NodeMeta
from cluster.runner import ClusterEvent, ClusterRunner


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _Reporter:
    """Print the node's view whenever it changes."""

    def __init__(self, runner: ClusterRunner) -> None:
        self.runner = runner
        self.last: Any = None

    def check(self, _event: ClusterEvent | None = None) -> None:
        r = self.runner
        primary = r.primary()
        view = {
            "members": {m.name: m.state.name.lower() for m in r.members()},
            "primary": list(primary) if primary else None,
            "is_primary": r.is_primary(),
            "term": r.term,
            "dropped": r.dropped(),
            "windows": _windows(r),
        }
        # Drop counters alone change all the time (stale acks): they ride along, never trigger.
        key = {k: v for k, v in view.items() if k != "dropped"}
        if key != self.last:
            self.last = key
            _emit({"event": "view", "t": time.monotonic(), "name": r.name, **view})


def _windows(r: ClusterRunner) -> list[list[float]]:
    """Return this node's acting windows as [term, first start, last end], one per term."""
    merged: dict[int, list[float]] = {}
    for start, end, term in r.election.windows:
        w = merged.setdefault(term, [float(term), start, end])
        w[1], w[2] = min(w[1], start), max(w[2], end)
    return sorted(merged.values())


async def _main(args: argparse.Namespace) -> int:
    config = PROFILES[args.profile]()
    config = dataclasses.replace(
        config,
        name=args.name,
        bind=args.bind,
        voters=tuple(v for v in args.voters.split(",") if v),
        seeds=() if args.hold_join else tuple(args.seed),
    )
    keyring = read_key_file(args.key_file) if args.key_file else Keyring(())
    meta = NodeMeta(
        devices=(DeviceMeta("cpu", 1000, args.free_mb, 0),),
        loaded=tuple(ModelMeta(m) for m in args.loaded.split(",") if m),
    )
    reporter: _Reporter | None = None

    def on_event(event: ClusterEvent) -> None:
        if reporter is not None:
            reporter.check(event)

    runner = ClusterRunner(
        config, args.name, keyring, MemoryTermStore(), lambda: meta, on_event=on_event
    )
    await runner.start()
    reporter = _Reporter(runner)
    host, port = runner.addr
    _emit({"event": "ready", "name": args.name, "addr": f"{host}:{port}", "pid": os.getpid()})

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def poll() -> None:
        while True:
            reporter.check()
            await asyncio.sleep(0.1)  # member changes report at once via the event hook

    poller = asyncio.create_task(poll())
    try:
        while line := (await stdin.readline()).decode().strip():
            if line == "join":
                await runner.join(args.seed)
            elif line == "leave":
                ok = await runner.leave(timeout=args.leave_timeout)
                _emit({"event": "left", "ok": ok})
                break
            elif line == "stop":
                break
    finally:
        poller.cancel()
        await runner.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one node until told to stop."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--bind", default="127.0.0.1:0")
    ap.add_argument("--seed", action="append", default=[], help="host:port, repeatable")
    ap.add_argument("--voters", default="", help="comma-separated voter names")
    ap.add_argument("--key-file", default="")
    ap.add_argument("--profile", default="local", choices=sorted(PROFILES))
    ap.add_argument("--hold-join", action="store_true", help="join only on a 'join' command")
    ap.add_argument("--loaded", default="", help="comma-separated model names to advertise")
    ap.add_argument("--free-mb", type=int, default=1000)
    ap.add_argument("--leave-timeout", type=float, default=3.0)
    return asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
