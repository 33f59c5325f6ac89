"""The process one learning job trains in, forked by `job_supervisor.JobProcess`.

The process is forked from the learning fork server (see `job_supervisor`), a template process
that imported torch and the training modules once, so a job starts in a fraction of a second
instead of paying an interpreter start and the torch import. `run_forked` is its entry point:
it gets the job (`encode_job`'s JSON: the job id, the learning config and the model files the
node resolved), the write end of its events pipe and its log file. It opens the job store
itself (SQLite WAL: the node and this process write it at once, each write a short
transaction), runs `runner.run_job`, and reports on the events pipe, one JSON object a message:

    {"event": "started", "job_id", "step", "pid", "parent"}   progress, for on_progress
    {"event": "step", "job_id", "step", "loss", "tokens"}
    {"event": "result", "ending": "completed" | "stopped", "output_path", "lora_base"}
    {"event": "error", "error": "what failed the job"}

It exits 0 after a result and 1 after an error. SIGTERM stops the job before its next step
(it ends "stopped": the node knows whether it asked for a cancel or a shutdown). SIGINT is
ignored, so a Ctrl-C meant for the node does not fail its jobs. A watchdog thread exits the
process (code 3) as soon as the node is gone (the events pipe lost its reader), so a killed
node leaves no orphan training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from actors.errors import MocError
from actors.learning.config import LearningConfig

EXIT_FAILED = 1
EXIT_ORPHANED = 3


def encode_job(job_id: str, config: LearningConfig, models: dict[str, Path]) -> str:
    """Return the JSON argument that tells a job process what to run."""
    return json.dumps(
        {
            "job_id": job_id,
            "config": dataclasses.asdict(config),
            "models": {name: str(path) for name, path in models.items()},
        }
    )


def decode_job(text: str) -> tuple[str, LearningConfig, dict[str, Path]]:
    """Parse `encode_job`'s JSON: the job id, its config and the model files by name."""
    raw = json.loads(text)
    fields = dict(raw["config"])
    fields["dataset_dirs"] = tuple(fields.get("dataset_dirs", ()))
    models = {str(name): Path(path) for name, path in raw["models"].items()}
    return str(raw["job_id"]), LearningConfig(**fields), models


def describe_error(exc: BaseException) -> str:
    """Say what failed a job: a MocError's own message, otherwise the type and the message."""
    return str(exc) if isinstance(exc, MocError) else f"{type(exc).__name__}: {exc}"


def _start_watchdog(events_fd: int) -> None:
    """Exit at once when the node is gone: the events pipe's write end then reports POLLERR.

    The node is not this process's parent (the fork server is), so getppid cannot tell; the
    node holds the pipe's only read end, which the kernel closes however the node dies. A
    thread, so that it also fires in the middle of a long torch call.
    """

    def watch() -> None:
        poller = select.poll()
        poller.register(events_fd, select.POLLERR | select.POLLHUP)
        while True:
            for _, mask in poller.poll():
                if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="node-watchdog", daemon=True).start()


class _Events:
    """The events pipe: one JSON object per message."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def emit(self, event: dict[str, Any]) -> None:
        self._conn.send_bytes(json.dumps(event).encode())


def run(
    job_id: str,
    config: LearningConfig,
    models: dict[str, Path],
    events: _Events,
    stop: threading.Event,
) -> int:
    """Run the job to its end in this process; return the exit code.

    `stop` is set by SIGTERM (only a flag: the runner checks it before every step).
    """
    from actors.learning.jobs import JobStore

    store = JobStore(config.job_store)
    try:
        job = store.get(job_id, history=False)
        if job is None:
            events.emit({"event": "error", "error": f"no learning job {job_id} in the store"})
            return EXIT_FAILED
        try:
            import torch

            from actors.learning.training import JobContext, run_job

            if config.torch_threads:
                torch.set_num_threads(config.torch_threads)

            def on_progress(event: dict[str, Any]) -> None:
                if event.get("event") == "started":
                    event = {**event, "pid": os.getpid(), "parent": os.getppid()}
                events.emit(event)

            ctx = JobContext(
                job=job,
                config=config,
                store=store,
                resolve_model=lambda name: models[name],
                cancel=threading.Event(),  # the node decides what a stop means
                stop=stop,
                on_progress=on_progress,
            )
            result = run_job(ctx)
        except Exception as exc:
            events.emit({"event": "error", "error": describe_error(exc)})
            return EXIT_FAILED
        events.emit(
            {
                "event": "result",
                "ending": "completed" if result.ending == "completed" else "stopped",
                "output_path": None if result.output_path is None else str(result.output_path),
                "lora_base": result.lora_base,
            }
        )
        return 0
    finally:
        store.close()


def ready() -> int:
    """Return this process's id: a no-op job that makes the fork server finish its imports."""
    return os.getpid()


def run_forked(job_text: str, events: Connection, log_path: str) -> None:
    """Run a job in this forked process: the entry point `JobProcess` starts; exits with its code."""
    # First, so that a SIGTERM sent right after the start stops the job instead of killing it.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _redirect_output(log_path)
    _start_watchdog(events.fileno())
    job_id, config, models = decode_job(job_text)
    try:
        code = run(job_id, config, models, _Events(events), stop)
    finally:
        events.close()
    sys.exit(code)


def _redirect_output(log_path: str) -> None:
    """Send this process's stdout and stderr (llama.cpp and torch write there) to its log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
