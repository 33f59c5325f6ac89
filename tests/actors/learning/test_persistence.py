"""kill -9 of the process running the LearningActor mid-job: the job's process exits by itself,
and the job resumes and ends the same.

Tolerance: with torch on one thread the summation order is fixed, batches are a function of
(seed, step) and the checkpoint holds the adapters and the Adam state exactly, so a resumed run
is bit-identical to an uninterrupted one. The test allows 1e-6 absolute on the final loss and
the held-out loss, which only a change of BLAS kernel between the two runs could use.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import actors

ROOT = str(Path(actors.__file__).resolve().parent.parent)


def harness(config: dict[str, Any], models: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.actors.learning.harness",
            json.dumps(config),
            "--models",
            json.dumps(models),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def finish(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def gone(pid: int) -> bool:
    """Say whether a process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"harness exited early: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "the job never reached the blocking step"
        time.sleep(0.02)


def test_a_job_killed_mid_run_resumes_from_its_checkpoint_and_ends_with_the_same_loss(
    tiny_gguf: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    spec = {
        "job_type": "lora",
        "model_name": "tiny",
        "dataset_path": str(dataset_dir / "text.jsonl"),
        "priority": "high",
        "training_params": {"steps": 30, "seq_len": 32, "batch_size": 2, "seed": 11, "lr": 5e-3},
    }
    models = {"tiny": str(tiny_gguf)}

    def config(name: str) -> dict[str, Any]:
        return {
            "job_store": str(tmp_path / name / "jobs.db"),
            "output_dir": str(tmp_path / name / "out"),
            "dataset_dirs": [str(dataset_dir)],
            "checkpoint_every": 10,
            "torch_threads": 1,
            "retry_interval_s": 0.05,
        }

    marker = tmp_path / "blocked"
    first = harness(
        config("a"),
        models,
        "--submit",
        json.dumps(spec),
        "--block-at",
        "25",
        "--marker",
        str(marker),
    )
    wait_for_file(marker, first)
    child = int(marker.read_text())
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    with contextlib.suppress(ProcessLookupError):  # it may have finished before the SIGSTOP
        os.kill(child, signal.SIGCONT)  # the frozen job process: its watchdog finds no parent
    deadline = time.monotonic() + 30
    while not gone(child):
        assert time.monotonic() < deadline, "the orphaned job process did not exit"
        time.sleep(0.02)

    from actors.learning.jobs import JobStore

    store = JobStore(tmp_path / "a" / "jobs.db")
    (killed,) = store.jobs()
    assert killed.status == "running" and killed.checkpoint_step == 20 and killed.step >= 20
    store.close()

    (resumed,) = finish(harness(config("a"), models))
    (straight,) = finish(harness(config("b"), models, "--submit", json.dumps(spec)))
    assert resumed["status"] == straight["status"] == "completed", (resumed, straight)
    assert resumed["attempts"] == 2 and straight["attempts"] == 1
    assert not resumed["torch_in_actor_process"] and not straight["torch_in_actor_process"]
    assert [s for s, _ in resumed["loss_history"]] == list(range(1, 31))
    assert resumed["loss_history"][-1][1] == pytest.approx(
        straight["loss_history"][-1][1], abs=1e-6
    )
    after_r, after_s = (
        resumed["metrics"]["after"]["eval_loss"],
        straight["metrics"]["after"]["eval_loss"],
    )
    assert after_r == pytest.approx(after_s, abs=1e-6)
    assert resumed["metrics"]["before"] == straight["metrics"]["before"]
