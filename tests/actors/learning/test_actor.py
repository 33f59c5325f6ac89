"""The LearningActor: jobs end to end, priority then age, max_parallel_jobs, cancel, memory claims."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.errors import MocError, ModelNotFound, NameTaken
from actors.learning.actor import LearningActor, settle
from actors.learning.config import LearningConfig
from actors.learning.errors import DatasetInvalid, DatasetNotAllowed, InvalidJobSpec, JobNotFound
from actors.learning.job_supervisor import JobExit
from actors.learning.jobs import FINAL


def wait_for(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@dataclass
class Harness:
    """A started actor plus what its callbacks saw; `gates` hold jobs at their start."""

    proxy: Any
    registered: list[tuple[str, Path, str | None]] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    parents: dict[str, int] = field(default_factory=dict)
    claims: dict[str, float] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    hold_all: bool = False
    memory_ok: bool = True

    def job(self, job_id: str) -> dict[str, Any]:
        return self.proxy.get(job_id).get()  # type: ignore[no-any-return]

    def wait_status(self, job_id: str, *statuses: str) -> dict[str, Any]:
        wait_for(lambda: self.job(job_id)["status"] in statuses)
        return self.job(job_id)


@pytest.fixture
def start(tiny_gguf: Path, dataset_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    refs: list[pykka.ActorRef[Any]] = []
    harnesses: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        config = LearningConfig(
            job_store=str(tmp_path / "jobs.db"),
            output_dir=str(tmp_path / "out"),
            dataset_dirs=(str(dataset_dir),),
            checkpoint_every=5,
            retry_interval_s=0.02,
            **{"torch_threads": 1, **overrides},  # the children do not inherit the fixture's
        )
        h = Harness(proxy=None)

        def claim(job_id: str, mb: float) -> bool:
            if h.memory_ok:
                h.claims[job_id] = mb
            return h.memory_ok

        def on_progress(event: dict[str, Any]) -> None:
            if event["event"] == "started":
                h.pids[event["job_id"]] = event["pid"]
                h.parents[event["job_id"]] = event["parent"]
                h.started.append(event["job_id"])
                if h.hold_all:
                    gate = h.gates.setdefault(event["job_id"], threading.Event())
                    assert gate.wait(60)

        ref = LearningActor.start(
            config,
            claim=claim,
            release=h.released.append,
            resolve_model=lambda name: {"tiny": tiny_gguf}[name],
            register=lambda name, path, base, done: (
                h.registered.append((name, path, base)),
                done(None, None),
            ),
            on_progress=on_progress,
        )
        refs.append(ref)
        h.proxy = ref.proxy()
        harnesses.append(h)
        return h

    yield make
    for h in harnesses:
        for gate in h.gates.values():
            gate.set()
    for ref in refs:
        ref.stop()


def spec(dataset_dir: Path, **kw: Any) -> dict[str, Any]:
    params = {
        "steps": 6,
        "seq_len": 32,
        "batch_size": 2,
        "lr": 5e-3,
        **kw.pop("training_params", {}),
    }
    return {
        "job_type": "lora",
        "model_name": "tiny",
        "dataset_path": str(dataset_dir / "text.jsonl"),
        "training_params": params,
        **kw,
    }


def test_a_lora_job_runs_to_the_end_and_its_adapter_is_registered_against_the_base(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start()
    job_id = h.proxy.submit(spec(dataset_dir, training_params={"steps": 12})).get()
    job = h.wait_status(job_id, *FINAL)
    assert job["status"] == "completed", job["error"]
    assert job["step"] == 12 and job["progress"] == 1.0
    assert [s for s, _ in job["loss_history"]] == list(range(1, 13))
    assert job["metrics"]["after"]["eval_loss"] < job["metrics"]["before"]["eval_loss"]
    name, path, base = h.registered[0]
    assert name == f"tiny@{job_id}" == job["output_name"] and base == "tiny"
    assert path.is_file() and str(path) == job["output_path"]
    assert job_id in h.claims and h.claims[job_id] > 64 and h.released == [job_id]
    assert [j["job_id"] for j in h.proxy.list_jobs().get()] == [job_id]


def test_jobs_start_by_priority_then_age_one_at_a_time(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start(max_parallel_jobs=1)
    h.hold_all = True
    blocker = h.proxy.submit(spec(dataset_dir, priority="low")).get()
    wait_for(lambda: h.started == [blocker])
    low = h.proxy.submit(spec(dataset_dir, priority="low")).get()
    high1 = h.proxy.submit(spec(dataset_dir, priority="high")).get()
    medium = h.proxy.submit(spec(dataset_dir, priority="medium")).get()
    high2 = h.proxy.submit(spec(dataset_dir, priority="high")).get()
    critical = h.proxy.submit(spec(dataset_dir, priority="critical")).get()
    assert {h.job(j)["status"] for j in (low, high1, medium, high2, critical)} == {"queued"}
    h.hold_all = False
    h.gates[blocker].set()
    for j in (critical, high1, high2, medium, low):
        h.wait_status(j, "completed")
    assert h.started == [blocker, critical, high1, high2, medium, low]


def test_no_more_than_max_parallel_jobs_run_at_once(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start(max_parallel_jobs=2)
    h.hold_all = True
    ids = [h.proxy.submit(spec(dataset_dir)).get() for _ in range(3)]
    wait_for(lambda: len(h.started) == 2)
    assert [h.job(j)["status"] for j in ids] == ["running", "running", "queued"]
    assert len(h.claims) == 2
    h.gates[ids[0]].set()
    wait_for(lambda: len(h.started) == 3)
    assert set(h.started[:2]) == set(ids[:2]) and h.started[2] == ids[2]  # the first two race
    for gate_id in ids[1:]:
        h.gates[gate_id].set()
    for j in ids:
        h.wait_status(j, "completed")


def test_cancel_works_while_queued_while_running_and_while_waiting_for_memory(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start(max_parallel_jobs=1)
    long = h.proxy.submit(spec(dataset_dir, training_params={"steps": 100_000})).get()
    queued = h.proxy.submit(spec(dataset_dir)).get()
    wait_for(lambda: h.job(long)["step"] >= 2)
    assert h.proxy.cancel(queued).get()["status"] == "cancelled"
    assert h.proxy.cancel(long).get()["status"] in ("cancelling", "cancelled")
    job = h.wait_status(long, "cancelled")
    assert 2 <= job["step"] < 100_000 and job["output_path"] is None
    wait_for(lambda: long in h.released)
    assert h.registered == []
    h.memory_ok = False
    waiting = h.proxy.submit(spec(dataset_dir)).get()
    wait_for(lambda: (h.job(waiting)["detail"] or "").startswith("waiting for"))
    assert h.proxy.cancel(waiting).get()["status"] == "cancelled"
    assert h.proxy.cancel(waiting).get()["status"] == "cancelled"  # idempotent
    with pytest.raises(JobNotFound):
        h.proxy.cancel("nope").get()


def test_a_job_waits_for_memory_then_runs_or_fails_with_a_clear_error(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start(memory_wait_s=30.0)
    h.memory_ok = False
    job_id = h.proxy.submit(spec(dataset_dir)).get()
    wait_for(lambda: "MiB of device memory" in (h.job(job_id)["detail"] or ""))
    assert h.job(job_id)["status"] == "queued"
    h.memory_ok = True
    assert h.wait_status(job_id, *FINAL)["status"] == "completed"


def test_a_job_that_never_gets_its_memory_fails_naming_the_wait(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start(memory_wait_s=0.1)
    h.memory_ok = False
    job = h.wait_status(h.proxy.submit(spec(dataset_dir)).get(), *FINAL)
    assert job["status"] == "failed"
    assert "MiB of device memory" in job["error"] and "memory_wait_s" in job["error"]


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"job_type": "sleep"}, InvalidJobSpec, "job_type"),
        ({"model_name": ""}, InvalidJobSpec, "model_name"),
        ({"model_name": "ghost"}, ModelNotFound, "ghost"),
        ({"priority": "urgent"}, InvalidJobSpec, "priority"),
        ({"training_params": {"steps": 0}}, InvalidJobSpec, "training_params.steps"),
        ({"training_params": {"epochs_x": 1}}, InvalidJobSpec, "training_params.epochs_x"),
        ({"dataset_path": "/etc/passwd"}, DatasetNotAllowed, "outside the dataset directories"),
        ({"job_type": "rlhf"}, DatasetInvalid, "line 1"),
        # Output names become model names and file names (actors.names).
        ({"output_name": "out\x00put"}, InvalidJobSpec, "output_name: contains a control"),
        ({"output_name": "o" * 256}, InvalidJobSpec, "output_name: is 256 bytes"),
        ({"output_name": "../../etc/x"}, InvalidJobSpec, "output_name: contains a path sep"),
        ({"output_name": "sur\ud800"}, InvalidJobSpec, "output_name: contains a lone surrogate"),
        ({"replace": "yes"}, InvalidJobSpec, "replace"),
        ({"dataset_path": "d/" * 2500}, InvalidJobSpec, "dataset_path: is 5000 bytes"),
        ({"model_name": "m" * 120}, InvalidJobSpec, "output_name: required when model_name"),
        # A job's output never shadows a model by accident (issue 13, finding 3).
        ({"output_name": "tiny"}, NameTaken, "output_name: model 'tiny' exists"),
    ],
    ids=[
        "job-type",
        "no-model",
        "unknown-model",
        "priority",
        "steps",
        "unknown-param",
        "outside",
        "wrong-kind",
        "output-nul",
        "output-256-bytes",
        "output-path",
        "output-surrogate",
        "replace-not-a-bool",
        "dataset-path-5000",
        "default-output-too-long",
        "output-shadows-a-model",
    ],
)
def test_bad_specs_are_refused_with_a_message_naming_the_field(
    start: Callable[..., Harness],
    dataset_dir: Path,
    change: dict[str, Any],
    error: type[MocError],
    words: str,
) -> None:
    h = start()
    s = spec(dataset_dir)
    s.update(change)
    with pytest.raises(error, match=words):
        h.proxy.submit(s).get()
    assert h.proxy.list_jobs().get() == []


def test_an_output_a_pending_job_will_produce_is_refused_unless_replace_is_asked(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start()
    h.hold_all = True
    first = h.proxy.submit(spec(dataset_dir, output_name="cats")).get()
    wait_for(lambda: h.started == [first])
    with pytest.raises(NameTaken, match=f"learning job {first} will produce 'cats'"):
        h.proxy.submit(spec(dataset_dir, output_name="cats")).get()
    second = h.proxy.submit(spec(dataset_dir, output_name="cats", replace=True)).get()
    assert h.job(second)["replace"] is True
    h.hold_all = False
    for gate in h.gates.values():
        gate.set()
    h.wait_status(first, *FINAL)


def test_replace_lets_a_job_output_take_an_existing_models_name(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start()
    job_id = h.proxy.submit(spec(dataset_dir, output_name="tiny", replace=True)).get()
    job = h.wait_status(job_id, *FINAL)
    assert job["status"] == "completed", job["error"]
    assert [(name, base) for name, _, base in h.registered] == [("tiny", "tiny")]


def test_jobs_train_in_processes_forked_from_one_fork_server_not_in_the_node(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start()
    first = h.proxy.submit(spec(dataset_dir)).get()
    assert h.wait_status(first, *FINAL)["status"] == "completed"
    second = h.proxy.submit(spec(dataset_dir)).get()
    assert h.wait_status(second, *FINAL)["status"] == "completed"
    assert os.getpid() not in (h.pids[first], h.pids[second])  # the actor runs in this process
    assert h.pids[first] != h.pids[second]
    # Both are forks of the same template process (it imported torch once), not of the node.
    assert h.parents[first] == h.parents[second] != os.getpid()


def test_a_job_whose_process_is_killed_fails_naming_the_signal(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start()
    job_id = h.proxy.submit(spec(dataset_dir, training_params={"steps": 100_000})).get()
    wait_for(lambda: h.job(job_id)["step"] >= 2)
    os.kill(h.pids[job_id], signal.SIGKILL)
    job = h.wait_status(job_id, *FINAL)
    assert job["status"] == "failed"
    assert "training process died (signal 9 (SIGKILL))" in job["error"]
    wait_for(lambda: job_id in h.released)
    assert h.registered == []


def test_a_cancelled_job_whose_process_does_not_stop_is_killed_after_the_grace_period(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start(stop_grace_s=0.5)
    job_id = h.proxy.submit(spec(dataset_dir, training_params={"steps": 100_000})).get()
    wait_for(lambda: h.job(job_id)["step"] >= 2)
    os.kill(h.pids[job_id], signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    assert h.proxy.cancel(job_id).get()["status"] == "cancelling"
    job = h.wait_status(job_id, *FINAL)
    assert job["status"] == "cancelled"
    assert "did not stop within 0.5 s of the cancel" in job["error"]
    assert "SIGKILL" in job["error"]
    wait_for(lambda: job_id in h.released)


def test_stop_all_stops_the_processes_and_leaves_the_jobs_queued_to_resume(
    start: Callable[..., Harness], dataset_dir: Path
) -> None:
    h = start()
    job_id = h.proxy.submit(spec(dataset_dir, training_params={"steps": 100_000})).get()
    wait_for(lambda: h.job(job_id)["checkpoint_step"] >= 5)
    pid = h.pids[job_id]
    h.proxy.stop_all().get()
    job = h.job(job_id)
    assert job["status"] == "queued" and job["checkpoint_step"] >= 5
    assert job_id in h.released
    with pytest.raises(ProcessLookupError):  # reaped, not only signalled
        os.kill(pid, 0)


_DONE = JobExit("completed", Path("/out.gguf"), returncode=0)
_STOPPED = JobExit("stopped", returncode=0)
_KILLED = JobExit("stopped", error="killed (signal 9 (SIGKILL))", killed=True, returncode=-9)
_DIED = JobExit("failed", error="the training process died", returncode=-11)


@pytest.mark.parametrize(
    ("ended", "cancelled", "stopping", "outcome"),
    [
        (_DONE, False, False, "complete"),
        (_DONE, True, False, "complete"),
        (_STOPPED, True, False, "cancel"),
        (_KILLED, True, True, "cancel"),
        (_DIED, True, False, "cancel"),
        (_STOPPED, False, True, "requeue"),
        (_KILLED, False, True, "requeue"),
        (_STOPPED, False, False, "requeue"),
        (_DIED, False, True, "requeue"),
        (_DIED, False, False, "fail"),
    ],
    ids=[
        "completed",
        "completed-despite-a-late-cancel",
        "cancelled",
        "cancelled-and-killed",
        "died-while-cancelling",
        "stopped-for-shutdown",
        "killed-at-shutdown",
        "sigterm-from-outside",
        "died-during-shutdown",
        "died",
    ],
)
def test_how_a_job_process_ended_decides_the_jobs_status(
    ended: JobExit, cancelled: bool, stopping: bool, outcome: str
) -> None:
    assert settle(ended, cancelled=cancelled, stopping=stopping) == outcome


def test_a_job_whose_output_name_became_a_model_while_it_ran_fails_instead_of_shadowing_it(
    tiny_gguf: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    models = {"tiny": tiny_gguf}
    registered: list[str] = []
    ref = LearningActor.start(
        LearningConfig(
            job_store=str(tmp_path / "jobs.db"),
            output_dir=str(tmp_path / "out"),
            dataset_dirs=(str(dataset_dir),),
            torch_threads=1,
        ),
        claim=lambda job_id, mb: True,
        release=lambda job_id: None,
        resolve_model=lambda name: models[name],
        register=lambda name, path, base, done: (registered.append(name), done(None, None)),
    )
    try:
        proxy = ref.proxy()
        job_id = proxy.submit(spec(dataset_dir, output_name="cats")).get()
        models["cats"] = tiny_gguf  # someone loads a model by that name meanwhile
        wait_for(lambda: proxy.get(job_id).get()["status"] in FINAL)
        job = proxy.get(job_id).get()
        assert job["status"] == "failed"
        assert "output_name: model 'cats' appeared while the job ran" in job["error"]
        assert registered == []
    finally:
        ref.stop()


def test_a_job_waiting_for_its_registration_leaves_the_actor_answering_and_ends_on_the_reply(
    tiny_gguf: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    answers: list[Callable[[None, Exception | None], None]] = []
    ref = LearningActor.start(
        LearningConfig(
            job_store=str(tmp_path / "jobs.db"),
            output_dir=str(tmp_path / "out"),
            dataset_dirs=(str(dataset_dir),),
            torch_threads=1,
        ),
        claim=lambda job_id, mb: True,
        release=lambda job_id: None,
        resolve_model=lambda name: {"tiny": tiny_gguf}[name],
        register=lambda name, path, base, done: answers.append(done),  # answers later
    )
    try:
        proxy = ref.proxy()
        job_id = proxy.submit(spec(dataset_dir)).get()
        wait_for(lambda: bool(answers))
        # The actor is not blocked on the registration: it answers, and the job is not over.
        assert proxy.get(job_id).get(timeout=5)["status"] == "running"
        answers[0](None, NameTaken("output_name", "taken by a load meanwhile"))
        wait_for(lambda: proxy.get(job_id).get()["status"] in FINAL)
        job = proxy.get(job_id).get()
        assert job["status"] == "failed"
        assert job["error"] == "cannot register the output: output_name: taken by a load meanwhile"
    finally:
        ref.stop()
