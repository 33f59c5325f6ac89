"""The errors of the goals package; each is a MocError so the transports map it once."""

from __future__ import annotations

from actors.errors import InvalidRequest, MocError, ShuttingDown


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
