"""kill -9 of a process running a goal: after a restart the goal resumes at its current step,
re-attaches to its learning job instead of resubmitting it, and never reruns a finished step."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.goals.model import Goal
from actors.goals.store import GoalStore
from tests.actors.goals.fakes import SqliteLearning, wait_until

ROOT = Path(__file__).resolve().parents[3]


class Node:
    """Starts and SIGKILLs the child process that runs the GoalActor."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc: subprocess.Popen[str] | None = None

    def start(self, create: bool = False) -> None:
        args = [sys.executable, "-m", "tests.actors.goals.goal_child", str(self.state)]
        self.proc = subprocess.Popen(
            args + (["--create"] if create else []), cwd=ROOT, stdout=subprocess.PIPE, text=True
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc = None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    made = Node(tmp_path)
    yield made
    if made.proc is not None:
        made.kill()


def runs(state: Path) -> list[str]:
    path = state / "runs.log"
    return path.read_text().splitlines() if path.exists() else []


def test_a_goal_killed_mid_plan_resumes_at_its_current_step_without_rerunning_any(
    node: Node,
) -> None:
    node.start(create=True)
    assert node.proc is not None and node.proc.stdout is not None
    goal_id = node.proc.stdout.readline().strip()
    store = GoalStore(node.state / "goals.db")
    learning = SqliteLearning(node.state / "learning.db")

    def goal() -> Goal:
        found = store.get(goal_id)
        assert found is not None
        return found

    # 1. Killed while the train step follows its job.
    wait_until(lambda: goal().states[0].handle is not None, what="the job to be recorded")
    job_id = goal().states[0].handle
    node.kill()
    node.start()
    wait_until(lambda: goal().states[0].attempts == 2, what="the train step to resume")
    assert [j["job_id"] for j in learning.jobs()] == [job_id]
    learning.set(job_id, "completed", 1.0)  # type: ignore[arg-type]

    # 2. Killed while deploying, after evaluate and gate finished.
    wait_until(lambda: any(r.startswith("deploy-start") for r in runs(node.state)))
    assert goal().current_step == 3
    node.kill()
    node.start()
    wait_until(lambda: sum(r.startswith("deploy-start") for r in runs(node.state)) == 2)
    (node.state / "release-deploy").touch()
    wait_until(lambda: goal().status == "completed", what="the goal to complete")

    done = goal()
    assert [s.status for s in done.states] == ["completed"] * 4
    assert [s.attempts for s in done.states] == [2, 1, 1, 2]
    assert len(learning.jobs()) == 1 and learning.jobs()[0]["cancels"] == 0
    candidate = f"tiny@goal-{goal_id}-0"
    assert runs(node.state) == [
        "evaluate",
        f"deploy-start {candidate}",
        f"deploy-start {candidate}",  # the step in flight at the kill runs again (idempotent)
        "deploy-done",
    ]
    assert done.states[3].result == {"model": candidate}
