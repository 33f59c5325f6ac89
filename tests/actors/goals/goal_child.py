"""A node-like process for the kill -9 test: a GoalActor over a file-backed fake learning service.

`python -m tests.actors.goals.goal_child STATE_DIR [--create]` starts the actor on
STATE_DIR/goals.db (creating one legacy goal with --create) and runs until killed. Evaluate and
deploy append to STATE_DIR/runs.log; deploy waits for STATE_DIR/release-deploy to exist.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from actors.goals.actor import GoalActor
from actors.goals.config import GoalsConfig
from actors.goals.executors import StepContext, StepOutcome
from actors.goals.model import Step
from tests.actors.goals.fakes import SqliteLearning, evaluation


def _log(state: Path, line: str) -> None:
    with (state / "runs.log").open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class LoggedEvaluate:
    def __init__(self, state: Path) -> None:
        self.state = state

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        _log(self.state, "evaluate")
        return evaluation(2.0, 1.5)


class HeldDeploy:
    def __init__(self, state: Path) -> None:
        self.state = state

    def run(self, step: Step, ctx: StepContext) -> StepOutcome:
        _log(self.state, f"deploy-start {ctx.inputs.candidate}")
        while not (self.state / "release-deploy").exists():
            if ctx.interrupt.wait(0.02):
                return StepOutcome("interrupted")
        _log(self.state, "deploy-done")
        return StepOutcome.done(model=ctx.inputs.candidate)


def main() -> None:
    state = Path(sys.argv[1])
    config = GoalsConfig(goal_store=str(state / "goals.db"), poll_interval_s=0.02)
    ref = GoalActor.start(
        config,
        learning=SqliteLearning(state / "learning.db"),
        resolve_model=lambda name: state / f"{name}.gguf",
        load=lambda name: None,
        unload=lambda name: None,
        executors={"evaluate": LoggedEvaluate(state), "deploy": HeldDeploy(state)},
    )
    if "--create" in sys.argv:
        goal = (
            ref.proxy()
            .create(
                {
                    "title": "survive kill -9",
                    "priority": "high",
                    "metadata": {"model_name": "tiny", "dataset_path": "/d.jsonl"},
                }
            )
            .get()
        )
        print(goal["goal_id"], flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
