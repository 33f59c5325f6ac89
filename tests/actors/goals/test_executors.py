"""Step executors: a train step re-attaches instead of resubmitting, and evaluation runs the
real llama.cpp scorer in a helper process on generated GGUF models, feeding a real gate."""

from __future__ import annotations

import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.goals.executors import (
    EvalSettings,
    EvaluateExecutor,
    GateExecutor,
    Interrupt,
    StepContext,
    StepOutcome,
    TrainExecutor,
)
from actors.goals.model import EvaluateStep, GateStep, TrainStep
from actors.goals.plan import StepInputs
from tests.actors.goals.fakes import SqliteLearning

JOB = {"job_type": "lora", "model_name": "tiny", "dataset_path": "/d.jsonl"}


def _ctx(**kw: object) -> StepContext:
    fields: dict[str, object] = {"goal_id": "g1", "index": 0, "inputs": StepInputs()}
    fields.update(kw)
    return StepContext(**fields)  # type: ignore[arg-type]


class InstantLearning(SqliteLearning):
    """Jobs complete as soon as they are submitted."""

    def submit(self, spec: dict[str, Any]) -> str:
        job_id = super().submit(spec)
        self.set(job_id, "completed", 1.0)
        return job_id


def test_a_train_step_submits_with_a_goal_unique_output_name_and_records_the_job() -> None:
    learning = InstantLearning()
    attached: list[str] = []
    outcome = TrainExecutor(learning, 0.01).run(TrainStep(job=JOB), _ctx(attach=attached.append))
    job = learning.jobs()[0]
    assert attached == [job["job_id"]]  # recorded even though the job was already done
    assert job["spec"] == {**JOB, "output_name": "tiny@goal-g1-0"}
    assert outcome.status == "completed"
    assert outcome.result["result_model"] == "tiny@goal-g1-0"


def test_a_resumed_train_step_re_attaches_to_the_job_it_submitted_but_never_recorded() -> None:
    learning = SqliteLearning()
    started = time.time()
    job_id = learning.submit({**JOB, "output_name": "tiny@goal-g1-0"})  # the lost attempt
    learning.set(job_id, "completed", 1.0)
    attached: list[str] = []
    ctx = _ctx(attach=attached.append, resumed=True, first_started_at=started)
    outcome = TrainExecutor(learning, 0.01).run(TrainStep(job=JOB), ctx)
    assert outcome.status == "completed"
    assert attached == [job_id]
    assert len(learning.jobs()) == 1


def test_a_resumed_train_step_with_a_recorded_job_follows_it_without_submitting() -> None:
    learning = SqliteLearning()
    job_id = learning.submit({**JOB, "output_name": "x"})
    learning.set(job_id, "failed", error="out of memory")
    outcome = TrainExecutor(learning, 0.01).run(
        TrainStep(job=JOB), _ctx(handle=job_id, resumed=True, first_started_at=0.0)
    )
    assert outcome.status == "failed"
    assert outcome.error == f"learning job {job_id} failed: out of memory"
    assert len(learning.jobs()) == 1


def test_a_job_cancelled_behind_the_goals_back_fails_the_step() -> None:
    learning = SqliteLearning()
    job_id = learning.submit(JOB)
    learning.cancel(job_id)
    outcome = TrainExecutor(learning, 0.01).run(TrainStep(job=JOB), _ctx(handle=job_id))
    assert outcome.status == "failed"
    assert "cancelled outside this goal" in (outcome.error or "")


def test_a_stopping_train_step_leaves_its_job_running() -> None:
    learning = SqliteLearning()
    job_id = learning.submit(JOB)
    interrupt = Interrupt()
    interrupt.fire("stop")
    outcome = TrainExecutor(learning, 0.01).run(
        TrainStep(job=JOB), _ctx(handle=job_id, interrupt=interrupt)
    )
    assert outcome.status == "interrupted"
    assert learning.jobs()[0]["status"] == "queued"
    assert learning.jobs()[0]["cancels"] == 0


# -- evaluation on real GGUF files ------------------------------------------------------------


@pytest.fixture
def eval_set(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "eval.jsonl"
    path.parent.mkdir()
    path.write_text(
        '{"text": "The quick brown fox jumps over the lazy dog."}\n'
        '{"prompt": "Q: what is two and two?\\nA:", "completion": " four, as always"}\n'
    )
    return path


def _tempered(base: Path, out: Path, factor: float) -> Path:
    """Copy a model with its final norm scaled: flatter logits, lower loss for a random model."""
    import gguf

    shutil.copyfile(base, out)
    reader = gguf.GGUFReader(str(out), "r+")
    for tensor in reader.tensors:
        if tensor.name == "output_norm.weight":
            tensor.data[:] = tensor.data * factor
    del reader
    return out


def _evaluate(models: dict[str, Path], eval_set: Path, base: str, candidate: str) -> object:
    executor = EvaluateExecutor(
        lambda name: models[name], [eval_set.parent], EvalSettings(n_ctx=128, max_tokens=4096)
    )
    return executor.run(
        EvaluateStep(eval_path=str(eval_set)),
        _ctx(inputs=StepInputs(base=base, candidate=candidate)),
    )


def test_an_identical_candidate_scores_as_the_base_and_fails_a_positive_gate(
    tiny_gguf: Path, eval_set: Path
) -> None:
    outcome = _evaluate({"tiny": tiny_gguf, "same": tiny_gguf}, eval_set, "tiny", "same")
    assert outcome.status == "completed", outcome.error  # type: ignore[attr-defined]
    result = outcome.result  # type: ignore[attr-defined]
    assert math.isfinite(result["base"]["loss"]) and result["base"]["tokens"] > 10
    assert result["candidate"]["loss"] == result["base"]["loss"]
    assert result["candidate"]["perplexity"] == pytest.approx(math.exp(result["base"]["loss"]))
    verdict = GateExecutor().run(
        GateStep(min_improvement=0.001), _ctx(inputs=StepInputs(evaluation=result))
    )
    assert verdict.status == "failed"
    assert "does not beat the base" in (verdict.error or "")


def test_a_better_candidate_passes_the_gate(
    tiny_gguf: Path, eval_set: Path, tmp_path: Path
) -> None:
    better = _tempered(tiny_gguf, tmp_path / "tempered.gguf", 0.1)
    outcome = _evaluate({"tiny": tiny_gguf, "better": better}, eval_set, "tiny", "better")
    result = outcome.result  # type: ignore[attr-defined]
    assert result["candidate"]["loss"] < result["base"]["loss"]
    verdict = GateExecutor().run(
        GateStep(min_improvement=0.05), _ctx(inputs=StepInputs(evaluation=result))
    )
    assert verdict.status == "completed", verdict.error


def test_an_unloadable_candidate_fails_the_evaluation_with_llama_cpps_reason(
    tiny_gguf: Path, eval_set: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    outcome = _evaluate({"tiny": tiny_gguf, "broken": broken}, eval_set, "tiny", "broken")
    assert outcome.status == "failed"  # type: ignore[attr-defined]
    assert outcome.error.startswith("evaluation failed:")  # type: ignore[attr-defined]


def test_an_evaluation_set_outside_the_dirs_fails_the_step(tiny_gguf: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("text")
    executor = EvaluateExecutor(lambda name: tiny_gguf, [tmp_path / "data"])
    outcome = executor.run(
        EvaluateStep(eval_path=str(elsewhere)), _ctx(inputs=StepInputs(base="a", candidate="b"))
    )
    assert outcome.status == "failed"
    assert "outside the evaluation directories" in (outcome.error or "")


def test_a_cancelled_evaluation_stops_its_helper_process(tiny_gguf: Path, eval_set: Path) -> None:
    interrupt = Interrupt()
    interrupt.fire("cancel")
    executor = EvaluateExecutor(lambda name: tiny_gguf, [eval_set.parent])
    outcome = executor.run(
        EvaluateStep(eval_path=str(eval_set)),
        _ctx(inputs=StepInputs(base="a", candidate="b"), interrupt=interrupt),
    )
    assert outcome.status == "cancelled"


class GoneLearning(SqliteLearning):
    """A learning service whose actor has stopped (the node is shutting down)."""

    def get(self, job_id: str) -> dict[str, Any]:
        raise pykka.ActorDeadError("LearningActor stopped")


def test_a_train_step_outliving_the_learning_actor_waits_for_the_stop_instead_of_failing() -> None:
    learning = GoneLearning()
    job_id = learning.submit(JOB)
    interrupt = Interrupt()
    outcomes: list[StepOutcome] = []
    thread = threading.Thread(
        target=lambda: outcomes.append(
            TrainExecutor(learning, 0.01).run(
                TrainStep(job=JOB), _ctx(handle=job_id, interrupt=interrupt)
            )
        )
    )
    thread.start()
    thread.join(0.2)
    assert thread.is_alive() and outcomes == []  # neither failed nor finished
    interrupt.fire("stop")
    thread.join(10)
    assert [o.status for o in outcomes] == ["interrupted"]
