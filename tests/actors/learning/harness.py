"""Run a LearningActor in its own process, for the kill -9 test.

    python -m tests.actors.learning.harness CONFIG_JSON [--submit SPEC_JSON] [--block-at N --marker F]

Starts the actor on the config, optionally submits one job, and, with --block-at, freezes the
job's process (SIGSTOP) once it reports step N and writes that process's pid to MARKER, so the
test can kill this process while the job is mid-run (the test resumes the frozen child with
SIGCONT and sees it exit by itself, its node gone). Prints the job id after submitting, and
when every job is final prints one JSON line per job: {"job_id", "status", "loss_history",
"metrics", "attempts", "error", "torch_in_actor_process"} (jobs train in forks of the fork
server, so this process never imports torch).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--models", required=True, help="JSON {name: path}")
    parser.add_argument("--submit")
    parser.add_argument("--block-at", type=int, default=0)
    parser.add_argument("--marker")
    args = parser.parse_args()

    from actors.learning.actor import LearningActor
    from actors.learning.config import LearningConfig
    from actors.learning.jobs import FINAL

    raw = json.loads(args.config)
    raw["dataset_dirs"] = tuple(raw.get("dataset_dirs", ()))
    config = LearningConfig(**raw)
    models = {k: Path(v) for k, v in json.loads(args.models).items()}
    frozen = threading.Event()
    pids: dict[str, int] = {}

    def on_progress(event: dict[str, Any]) -> None:
        if event.get("event") == "started":
            pids[event["job_id"]] = event["pid"]
        if args.block_at and event.get("event") == "step" and event["step"] == args.block_at:
            pid = pids[event["job_id"]]
            os.kill(pid, signal.SIGSTOP)
            Path(args.marker).write_text(str(pid))
            frozen.wait()  # never set: the test kills this process

    actor = LearningActor.start(
        config,
        claim=lambda job_id, mb: True,
        release=lambda job_id: None,
        resolve_model=lambda name: models[name],
        register=lambda name, path, base, done: done(None, None),
        on_progress=on_progress,
    ).proxy()
    if args.submit:
        print(actor.submit(json.loads(args.submit)).get(), flush=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        jobs = actor.list_jobs().get()
        if jobs and all(j["status"] in FINAL for j in jobs):
            break
        time.sleep(0.05)  # a process of its own polling its store, not a test's synchronisation
    for j in actor.list_jobs().get():
        full = actor.get(j["job_id"]).get()
        print(
            json.dumps(
                {
                    **{
                        k: full[k]
                        for k in (
                            "job_id",
                            "status",
                            "loss_history",
                            "metrics",
                            "attempts",
                            "error",
                        )
                    },
                    "torch_in_actor_process": "torch" in sys.modules,
                }
            ),
            flush=True,
        )
    actor.stop_all().get()
    actor.actor_ref.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
