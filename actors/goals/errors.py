"""The errors of the goals package; each is a MocError so the transports map it once."""

from __future__ import annotations

from actors.errors import InvalidRequest, MocError, Overloaded, ShuttingDown

GOALS_RETRY_AFTER_S = 30.0
"""Retry hint of TooManyGoals: a goal's steps take minutes, so sooner rarely finds room."""


class GoalError(MocError):
    """Base of the goals package's errors."""

    code = "goal_error"


class InvalidGoal(InvalidRequest):
    """A goal spec or one of its steps is missing a field or has a bad value (the field is named)."""

    code = "invalid_goal"


class GoalNotFound(GoalError):
    """No goal has this id."""

    code = "goal_not_found"


class GoalsStopping(ShuttingDown):
    """The goal actor is stopping and takes no new goals."""


class EvalSetInvalid(InvalidRequest):
    """An evaluation set is unreadable, outside the allowed directories, or has a bad line."""

    code = "eval_set_invalid"


class TooManyGoals(Overloaded):
    """`goals.max_open_goals` goals are pending or running: retry when some have finished."""

    code = "too_many_goals"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=GOALS_RETRY_AFTER_S)


class GoalStoreFull(GoalError):
    """`goals.max_stored_goals` goals are stored and none is finished, so none can be pruned."""

    code = "goal_store_full"
