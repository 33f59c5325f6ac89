"""The GoalActor: keeps the goals, runs up to `max_active_goals` plans, one step at a time each.

Decisions come from `plan` (order, what a finished step means) and every move is written to the
`GoalStore` before it is acted on. Each step runs in a thread of its own through the executor of
its kind (`executors`), which may wait on a learning job or a model load; the thread reports
back with a `step_finished` message, so this actor never waits on anyone. A cancel interrupts
the running step, whose executor cancels its learning job (the cascade). `stop_all` lets steps
go without undoing anything: after a restart (kill -9 included) each running goal resumes at its
current step, re-attaching to the job that step recorded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka

from actors.bridge import LoopReplyActor
from actors.goals import metrics
from actors.goals.config import GoalsConfig
from actors.goals.errors import (
    EvalSetInvalid,
    GoalNotFound,
    GoalsStopping,
    GoalStoreFull,
    InvalidGoal,
    TooManyGoals,
)
from actors.goals.evalset import allowed
from actors.goals.executors import (
    EvaluateExecutor,
    Interrupt,
    LearningService,
    ModelAction,
    ResolveModel,
    StepContext,
    StepExecutor,
    StepOutcome,
    as_learning_service,
    default_executors,
)
from actors.goals.model import FINAL_GOAL, EvaluateStep, Goal, GoalDraft, StepKind, StepState
from actors.goals.plan import after_step, next_runnable, parse_goal, step_inputs
from actors.goals.store import GoalStore

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """A step thread of one goal."""

    index: int
    thread: threading.Thread
    interrupt: Interrupt


class GoalActor(LoopReplyActor):
    """Keeps and runs goals; every public method is called through the actor's proxy.

    `learning` is a LearningService or the LearningActor's ref / proxy. `load` and `unload`
    are called from step threads (never from this actor's or the event loop's thread); they
    block until done and may raise the node's errors (ModelAlreadyLoaded on load and
    ModelNotLoaded on unload count as success). `eval_dirs` are the directories evaluation
    sets may come from besides `config.eval_dirs` (the node passes the learning dataset dirs).
    `executors` replaces the executors of the kinds it names (tests).
    """

    def __init__(
        self,
        config: GoalsConfig,
        *,
        learning: LearningService | Any,
        resolve_model: ResolveModel,
        load: ModelAction,
        unload: ModelAction,
        clock: Callable[[], float] = time.time,
        eval_dirs: Sequence[str | Path] = (),
        executors: Mapping[StepKind, StepExecutor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._clock = clock
        self._executors: dict[StepKind, StepExecutor] = default_executors(
            config,
            learning=as_learning_service(learning),
            resolve_model=resolve_model,
            load=load,
            unload=unload,
            eval_dirs=eval_dirs,
        )
        self._executors.update(executors or {})
        self._store = GoalStore(config.goal_store)
        self._runs: dict[str, _Run] = {}
        self._stopping = False
        self._proxy: Any = None

    # -- lifecycle ----------------------------------------------------------------------------

    def on_start(self) -> None:
        """Resume running goals at their current step, finish cancels a crash cut short, schedule."""
        self._proxy = self.actor_ref.proxy()
        running = self._store.list(("running",))
        if running:
            log.info("resuming %d goal(s): %s", len(running), [g.id for g in running])
        for goal in running:
            self._start_step(goal.id, goal.current_step)
        for goal in self._store.list(("cancelled",)):
            for state in goal.states:
                if state.status == "running":
                    self._finish_cancel(goal, state)
        self._schedule()

    def on_stop(self) -> None:
        """Let running steps go (they resume after a restart) and close the store."""
        self.stop_all()
        self._store.close()

    def on_failure(self, *args: object) -> None:
        for run in self._runs.values():
            run.interrupt.fire("stop")
        self._store.close()

    def stop_all(self) -> None:
        """Stop starting steps and let running ones go without undoing them; wait a while."""
        self._stopping = True
        for run in self._runs.values():
            run.interrupt.fire("stop")
        deadline = time.monotonic() + self.config.stop_timeout_s
        for goal_id, run in list(self._runs.items()):
            run.thread.join(max(0.0, deadline - time.monotonic()))
            if run.thread.is_alive():
                log.warning("goal %s: step %d still busy at stop; it resumes", goal_id, run.index)

    # -- the API ------------------------------------------------------------------------------

    def create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Check a goal spec (legacy or with `steps`), store the goal and return it."""
        if self._stopping:
            raise GoalsStopping("the goal actor is stopping and takes no new goals")
        draft = parse_goal(spec, self.config)
        self._check(draft)
        self._make_room()
        goal_id = uuid.uuid4().hex[:12]
        self._store.insert(goal_id, draft, self._clock())
        log.info("goal %s created: %s (%s)", goal_id, draft.title, draft.priority)
        self._schedule()
        return self._goal(goal_id).as_dict()

    def list_goals(self, limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
        """Return the goals oldest first: at most `limit` (None: all) from position `offset`."""
        return [g.as_dict() for g in self._store.list(limit=limit, offset=offset)]

    def get(self, goal_id: str) -> dict[str, Any]:
        """Return one goal with its steps, their state and results."""
        return self._goal(goal_id).as_dict()

    def cancel(self, goal_id: str) -> dict[str, Any]:
        """Cancel a goal; its running step cancels its learning job. A finished goal is kept."""
        goal = self._goal(goal_id)
        if goal.status not in FINAL_GOAL and self._store.cancel_goal(goal_id, self._clock()):
            metrics.goals_cancelled_total.inc()
            if goal.status == "running":
                self._observe_duration(goal, "cancelled")
            run = self._runs.get(goal_id)
            if run is not None:
                run.interrupt.fire("cancel")
            log.info("goal %s cancelled", goal_id)
            self._schedule()
        return self._goal(goal_id).as_dict()

    def ping(self) -> bool:
        """Answer True (the watchdog's proof that this actor still takes messages)."""
        return True

    # -- messages from step threads -----------------------------------------------------------

    def step_finished(self, goal_id: str, index: int, outcome: StepOutcome) -> None:
        """Record how a step ended and move its goal on (sent by the step's thread)."""
        run = self._runs.get(goal_id)
        if run is not None and run.index == index:
            del self._runs[goal_id]
        if outcome.status == "interrupted" or (self._stopping and outcome.status == "failed"):
            # The node is stopping: the step stays running and resumes after a restart. A
            # failure now may be the shutdown itself (a collaborator stopped first), so it is
            # not held against the goal; a real one recurs when the step runs again.
            return
        now = self._clock()
        goal = self._store.get(goal_id)
        if goal is None:
            return
        metrics.goal_steps_total.labels(goal.steps[index].kind, outcome.status).inc()
        if outcome.status == "cancelled" or goal.status == "cancelled":
            self._store.step_cancelled(goal_id, index, outcome.result, now)
            return
        ok = outcome.status == "completed"
        transition = after_step(goal, index, ok, outcome.error)
        written = self._store.finish_step(
            goal_id,
            index,
            ok=ok,
            result=outcome.result,
            error=outcome.error,
            transition=transition,
            now=now,
        )
        if not written:
            return
        if transition.status == "running":
            if not self._stopping:
                self._start_step(goal_id, transition.current_step)
        else:
            if transition.status == "completed":
                metrics.goals_completed_total.inc()
            else:
                metrics.goals_failed_total.inc()
                log.warning("goal %s failed: %s", goal_id, transition.error)
            self._observe_duration(goal, transition.status)
            self._schedule()

    # -- internals ----------------------------------------------------------------------------

    def _goal(self, goal_id: str) -> Goal:
        goal = self._store.get(goal_id)
        if goal is None:
            raise GoalNotFound(f"no goal {goal_id}")
        return goal

    def _check(self, draft: GoalDraft) -> None:
        """Refuse at creation what would only fail later: an evaluation set outside the dirs."""
        executor = self._executors.get("evaluate")
        if not isinstance(executor, EvaluateExecutor):
            return
        for index, step in enumerate(draft.steps):
            if not isinstance(step, EvaluateStep):
                continue
            where = f"steps[{index}].eval_path"
            if draft.legacy:
                where = "metadata." + (
                    "eval_path" if "eval_path" in draft.metadata else "dataset_path"
                )
            try:
                allowed(step.eval_path, executor.eval_dirs)
            except EvalSetInvalid as exc:
                raise InvalidGoal(where, str(exc).removeprefix("eval_path: ")) from None

    def _make_room(self) -> None:
        """Refuse a goal past the open cap (429); prune finished ones past the stored cap (507
        if none can go)."""
        limits = self.config
        open_goals = self._store.count(("pending", "running"))
        if open_goals >= limits.max_open_goals:
            metrics.goals_refused_total.labels(TooManyGoals.code).inc()
            raise TooManyGoals(
                f"{open_goals} goals are pending or running, the limit "
                f"(goals.max_open_goals = {limits.max_open_goals}); retry when some finish"
            )
        pruned = self._store.prune_finished(limits.max_stored_goals - 1)
        if pruned:
            metrics.goals_pruned_total.inc(pruned)
            log.info("pruned the %d oldest finished goal(s): goals.max_stored_goals", pruned)
        stored = self._store.count()
        if stored >= limits.max_stored_goals:
            metrics.goals_refused_total.labels(GoalStoreFull.code).inc()
            raise GoalStoreFull(
                f"the goal store holds {stored} goals, the limit "
                f"(goals.max_stored_goals = {limits.max_stored_goals}), and none is finished "
                "so none can be pruned"
            )

    def _schedule(self) -> None:
        """Start the goals next in line while there is room."""
        if not self._stopping:
            for goal in next_runnable(
                self._store.list(("pending", "running")), self.config.max_active_goals
            ):
                if self._store.start_goal(goal.id, self._clock()):
                    log.info("goal %s started", goal.id)
                    self._start_step(goal.id, goal.current_step)
        self._refresh_gauges()

    def _start_step(self, goal_id: str, index: int) -> None:
        """Mark the step running (durably) and run it in a thread of its own."""
        goal = self._store.get(goal_id)
        state = self._store.begin_step(goal_id, index, self._clock())
        if goal is None or state is None:
            log.error("goal %s: step %d cannot start (state changed meanwhile)", goal_id, index)
            return
        self._run(goal, state, Interrupt())

    def _finish_cancel(self, goal: Goal, state: StepState) -> None:
        """Cancel what a step of a cancelled goal had started before the node died."""
        if state.handle is None:
            self._store.step_cancelled(goal.id, state.index, {}, self._clock())
            return
        interrupt = Interrupt()
        interrupt.fire("cancel")
        self._run(goal, state, interrupt)

    def _run(self, goal: Goal, state: StepState, interrupt: Interrupt) -> None:
        index = state.index
        step = goal.steps[index]
        executor = self._executors[step.kind]
        store = self._store
        ctx = StepContext(
            goal_id=goal.id,
            index=index,
            inputs=step_inputs(goal.steps, goal.states, index),
            handle=state.handle,
            first_started_at=state.started_at,
            resumed=state.attempts > 1,
            attach=lambda handle: store.attach(goal.id, index, handle),
            progress=lambda fraction: store.set_progress(goal.id, index, fraction),
            interrupt=interrupt,
        )
        proxy = self._proxy

        def body() -> None:
            try:
                outcome = executor.run(step, ctx)
            except Exception as exc:  # a bug in an executor fails its step, not the actor
                log.exception("goal %s: step %d (%s) raised", goal.id, index, step.kind)
                outcome = StepOutcome.failed(f"{type(exc).__name__}: {exc}")
            # Stopped meanwhile: the store says where the goal stands.
            with contextlib.suppress(pykka.ActorDeadError):
                proxy.step_finished(goal.id, index, outcome)

        thread = threading.Thread(target=body, name=f"goal-{goal.id}-{index}", daemon=True)
        self._runs[goal.id] = _Run(index, thread, interrupt)
        thread.start()

    def _observe_duration(self, goal: Goal, outcome: str) -> None:
        if goal.started_at is not None:
            elapsed = max(0.0, self._clock() - goal.started_at)
            metrics.goals_execution_duration_seconds.labels(outcome).observe(elapsed)

    def _refresh_gauges(self) -> None:
        goals = self._store.list(("pending", "running"))
        metrics.goals_active_total.set(sum(g.status == "running" for g in goals))
        metrics.goals_pending.set(sum(g.status == "pending" for g in goals))
