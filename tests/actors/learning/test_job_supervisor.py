"""How a job process's end is judged (a table), and a real child's events and exit."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from actors.learning.config import LearningConfig
from actors.learning.job_process import EXIT_ORPHANED
from actors.learning.job_supervisor import JobExit, JobProcess, judge_exit

_RESULT = {"event": "result", "ending": "completed", "output_path": "/o.gguf", "lora_base": "b"}


@pytest.mark.parametrize(
    ("last", "code", "killed", "expected"),
    [
        (_RESULT, 0, False, JobExit("completed", Path("/o.gguf"), "b", returncode=0)),
        (
            {**_RESULT, "ending": "stopped", "output_path": None},
            0,
            False,
            JobExit("stopped", returncode=0),
        ),
        (
            {"event": "error", "error": "dataset gone"},
            1,
            False,
            JobExit("failed", error="dataset gone", returncode=1),
        ),
        (
            None,
            -9,
            True,
            JobExit("stopped", error="killed (signal 9 (SIGKILL))", killed=True, returncode=-9),
        ),
        (
            None,
            -11,
            False,
            JobExit(
                "failed",
                error="the training process died (signal 11 (SIGSEGV)) before reporting a result; "
                "its log ends: Fatal Python error",
                returncode=-11,
            ),
        ),
        (
            _RESULT,
            -9,
            False,
            JobExit(
                "failed",
                error="the training process died (signal 9 (SIGKILL)) before reporting a result; "
                "its log ends: Fatal Python error",
                returncode=-9,
            ),
        ),
        (
            None,
            EXIT_ORPHANED,
            False,
            JobExit(
                "failed",
                error="the training process exited because its parent process was gone; "
                "its log ends: Fatal Python error",
                returncode=EXIT_ORPHANED,
            ),
        ),
    ],
    ids=["completed", "stopped", "error", "killed", "segfault", "result-then-killed", "orphaned"],
)
def test_a_job_process_end_is_judged_from_its_last_report_and_exit(
    last: dict[str, Any] | None, code: int, killed: bool, expected: JobExit
) -> None:
    assert judge_exit(last, code, killed=killed, log_tail="Fatal Python error") == expected


def test_a_job_process_for_a_job_not_in_the_store_reports_the_error_and_exits_1(
    tmp_path: Path,
) -> None:
    config = LearningConfig(job_store=str(tmp_path / "jobs.db"), output_dir=str(tmp_path / "out"))
    events: list[dict[str, Any]] = []
    ended = threading.Event()
    process = JobProcess("nope", config, {}, on_event=events.append, on_exit=lambda _: ended.set())
    process.start()
    assert ended.wait(60)
    assert process.outcome == JobExit(
        "failed", error="no learning job nope in the store", returncode=1
    )
    assert events == []
    assert not process.log_path.exists() or process.log_path.read_text() == ""


def test_a_job_process_imports_this_tree_even_when_the_cwd_holds_another_actors_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / "cwd" / "actors"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the wrong actors package')\n")
    monkeypatch.chdir(shadow.parent)
    config = LearningConfig(job_store=str(tmp_path / "jobs.db"), output_dir=str(tmp_path / "out"))
    ended = threading.Event()
    process = JobProcess("nope", config, {}, on_event=lambda _: None, on_exit=lambda _: ended.set())
    process.start()
    assert ended.wait(60)
    assert process.outcome is not None
    assert process.outcome.error == "no learning job nope in the store"
