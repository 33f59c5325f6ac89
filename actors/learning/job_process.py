"""The process one learning job trains in, started by `job_supervisor.JobProcess`.

    python -m actors.learning.job_process --events-fd 5 --parent-pid 1234 JOB_JSON

JOB_JSON (see `encode_job`) names the job, the learning config and the model files the node
resolved for it. The process opens the job store itself (SQLite WAL: the node and this process
write it at once, each write a short transaction), runs `runner.run_job`, and reports on the
events pipe, one JSON object a line:

    {"event": "started", "job_id", "step", "pid"}       progress, forwarded to on_progress
    {"event": "step", "job_id", "step", "loss", "tokens"}
    {"event": "result", "ending": "completed" | "stopped", "output_path", "lora_base"}
    {"event": "error", "error": "what failed the job"}

It exits 0 after a result and 1 after an error. SIGTERM stops the job before its next step
(it ends "stopped": the node knows whether it asked for a cancel or a shutdown). SIGINT is
ignored, so a Ctrl-C meant for the node does not fail its jobs. A watchdog thread exits the
process (code 3) as soon as the node is gone, so a killed node leaves no orphan training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from actors.errors import MocError
from actors.learning.config import LearningConfig

EXIT_FAILED = 1
EXIT_ORPHANED = 3
_WATCHDOG_S = 0.2  # how often the watchdog looks for its parent


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


def _start_watchdog(parent_pid: int) -> None:
    """Exit at once when the parent dies (the process is re-parented, so getppid changes).

    A thread, so that it also fires in the middle of a long torch call.
    """

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(EXIT_ORPHANED)
            time.sleep(_WATCHDOG_S)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


class _Events:
    """The events pipe: one JSON line per event, flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def emit(self, event: dict[str, Any]) -> None:
        self._stream.write(json.dumps(event) + "\n")
        self._stream.flush()


def run(job_id: str, config: LearningConfig, models: dict[str, Path], events: _Events) -> int:
    """Run the job to its end in this process; return the exit code."""
    stop = threading.Event()
    # Only sets a flag: the runner checks it before every step.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    from actors.learning.jobs import JobStore

    store = JobStore(config.job_store)
    try:
        job = store.get(job_id, history=False)
        if job is None:
            events.emit({"event": "error", "error": f"no learning job {job_id} in the store"})
            return EXIT_FAILED
        try:
            import torch

            from actors.learning.runner import JobContext, run_job

            if config.torch_threads:
                torch.set_num_threads(config.torch_threads)

            def on_progress(event: dict[str, Any]) -> None:
                if event.get("event") == "started":
                    event = {**event, "pid": os.getpid()}
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


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the job."""
    parser = argparse.ArgumentParser(prog="python -m actors.learning.job_process")
    parser.add_argument("job", help="the job as encode_job writes it (JSON)")
    parser.add_argument("--events-fd", type=int, required=True, help="pipe for the events")
    parser.add_argument("--parent-pid", type=int, default=os.getppid(), help="exit when it dies")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _start_watchdog(args.parent_pid)
    job_id, config, models = decode_job(args.job)
    with os.fdopen(args.events_fd, "w", encoding="utf-8") as stream:
        return run(job_id, config, models, _Events(stream))


if __name__ == "__main__":
    sys.exit(main())
