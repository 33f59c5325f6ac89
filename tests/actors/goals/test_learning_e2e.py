"""End to end with the real LearningActor: a legacy goal trains a LoRA adapter on a generated
model with torch, evaluates it on top of its base through llama.cpp, gates and deploys it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from actors.bridge import Reply
from actors.goals.actor import GoalActor
from actors.goals.config import GoalsConfig
from actors.learning import actor as learning_actor
from actors.learning import config as learning_config
from tests.actors.goals.fakes import wait_until

CORPUS = [
    f"The {a} {v} on the {n}."
    for a in ("cat", "dog", "bird", "fox")
    for v in ("sat", "slept", "stood")
    for n in ("mat", "log", "rug")
]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine runs suites in parallel; tiny models hate threads
    yield
    torch.set_num_threads(before)


def test_a_legacy_goal_trains_evaluates_gates_and_deploys_a_real_lora_adapter(
    tiny_gguf: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    data = tmp_path / "datasets"
    data.mkdir()
    dataset = data / "text.jsonl"
    dataset.write_text("".join(json.dumps({"text": s}) + "\n" for s in CORPUS))
    models: dict[str, Path] = {"tiny": tiny_gguf}
    lora_bases: dict[str, str | None] = {}
    loaded: list[str] = []

    def register(name: str, path: Path, base: str | None, done: Reply[None]) -> None:
        models[name] = Path(path)
        lora_bases[name] = base
        done(None, None)

    learning = learning_actor.LearningActor.start(
        learning_config.LearningConfig(
            job_store=str(tmp_path / "jobs.db"),
            dataset_dirs=(str(data),),
            output_dir=str(tmp_path / "outputs"),
            retry_interval_s=0.05,
        ),
        claim=lambda job_id, mb: True,
        release=lambda job_id: None,
        resolve_model=lambda name: models[name],
        register=register,
    )
    goals = GoalActor.start(
        GoalsConfig(goal_store=str(tmp_path / "goals.db"), poll_interval_s=0.05),
        learning=learning,
        resolve_model=lambda name: models[name],
        load=loaded.append,
        unload=lambda name: None,
        eval_dirs=[str(data)],
    )
    try:
        proxy = goals.proxy()
        goal = proxy.create(
            {
                "title": "teach tiny about cats",
                "priority": "high",
                "metadata": {
                    "model_name": "tiny",
                    "dataset_path": str(dataset),
                    "training_params": {
                        "steps": 40,
                        "lr": 0.01,
                        "seq_len": 32,
                        "batch_size": 4,
                        "lora_rank": 4,
                        "eval_fraction": 0.0,
                    },
                    "min_improvement": 0.05,
                },
            }
        ).get()
        goal_id = goal["goal_id"]

        def final() -> bool:
            status: str = proxy.get(goal_id).get()["status"]
            return status in ("completed", "failed", "cancelled")

        wait_until(final, timeout=240, what="the goal to end")
        done: dict[str, Any] = proxy.get(goal_id).get()
        assert done["status"] == "completed", done["error"]
        candidate = f"tiny@goal-{goal_id}-0"
        train, evaluate, gate, deploy = (s["state"] for s in done["steps"])
        assert train["result"]["result_model"] == candidate
        assert lora_bases[candidate] == "tiny"
        assert evaluate["result"]["candidate_is_adapter"] is True
        assert evaluate["result"]["candidate"]["loss"] < evaluate["result"]["base"]["loss"]
        assert gate["result"]["passed"] is True
        assert deploy["result"]["model"] == candidate
        assert loaded == [candidate]
        jobs = learning.proxy().list_jobs().get()
        assert [j["status"] for j in jobs] == ["completed"]
    finally:
        goals.stop()
        learning.stop()
