"""The fronts' own errors, and the one mapping from any exception to what a client is told.

`classify` gives the (status, code, message) of a failure; the ZeroMQ, HTTP and OpenAI fronts
all answer with it, so an error reads the same on every transport. The node's errors are
`actors.errors`; the ones here are the fronts' own (bad frames, keys, sizes, slow clients).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from actors.errors import (
    Cancelled,
    FeatureUnavailable,
    InsufficientMemory,
    InvalidRequest,
    MocError,
    ModelAlreadyLoaded,
    ModelFileInvalid,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    PathNotAllowed,
    RequestTimeout,
    ShuttingDown,
    WorkerCrashed,
)

__all__ = [
    "SHUTDOWN_RETRY_AFTER_S",
    "STATUS",
    "STATUS_BY_CODE",
    "BadFrame",
    "classify",
    "ClientTimeout",
    "ErrorReply",
    "PayloadTooLarge",
    "TransportError",
    "Unauthorized",
    "UnknownAction",
]

log = logging.getLogger(__name__)


class TransportError(MocError):
    """Base of the errors the fronts themselves raise (as opposed to the node's)."""


class Unauthorized(TransportError):
    """The request carries no API key, or a key that is not accepted."""

    code = "unauthorized"


class UnknownAction(TransportError):
    """The request names an action the table does not have."""

    code = "unknown_action"


class BadFrame(TransportError):
    """The peer sent bytes that are not one JSON or msgpack object."""

    code = "bad_frame"


class PayloadTooLarge(TransportError):
    """The frame or body exceeds the configured size limit."""

    code = "too_large"


class ClientTimeout(TransportError):
    """The client did not send its request within the read timeout."""

    code = "client_timeout"


# The status of each error class; subclasses inherit through the MRO walk in `classify`.
STATUS: dict[type[BaseException], int] = {
    InvalidRequest: 400,
    ModelFileInvalid: 400,  # the file the client (or the catalog) named is not a model
    BadFrame: 400,
    UnknownAction: 400,
    Unauthorized: 401,
    PathNotAllowed: 403,
    ModelNotFound: 404,
    ModelNotLoaded: 404,
    ClientTimeout: 408,
    ModelAlreadyLoaded: 409,
    PayloadTooLarge: 413,
    Cancelled: 499,  # nginx's "client closed request": the client is gone and sees nothing
    WorkerCrashed: 500,
    ModelLoadFailed: 500,
    Overloaded: 503,  # CircuitOpen is an Overloaded: both tell the client to retry later
    ShuttingDown: 503,
    RequestTimeout: 504,
    InsufficientMemory: 507,
    FeatureUnavailable: 501,
}

# Errors of the learning and goals packages, by code (so the fronts need not import them).
STATUS_BY_CODE: dict[str, int] = {
    "job_not_found": 404,
    "goal_not_found": 404,
    "dataset_not_allowed": 403,
    "insufficient_memory": 507,
    "unsupported_model": 400,
    "name_taken": 409,  # a job output that would shadow a model; "replace": true allows it
    # Limits on what waits and what is stored (learning.max_queued_jobs, goals.max_open_goals;
    # learning.max_stored_jobs, goals.max_stored_goals): retry later, or the store is full.
    "too_many_jobs": 429,
    "too_many_goals": 429,
    "job_store_full": 507,
    "goal_store_full": 507,
    # The cluster: a peer that did not answer, no primary yet, a deposed primary's command.
    "peer_unavailable": 503,
    "no_primary": 503,
    "stale_term": 409,
}

# Retry hint for errors that carry none of their own (a draining node needs a few seconds).
SHUTDOWN_RETRY_AFTER_S = 5.0


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """What a client is told about one failure, whatever the transport."""

    status: int
    code: str
    message: str
    field: str | None = None
    retry_after: float | None = None


def classify(exc: BaseException) -> ErrorReply:
    """Map an exception to the status, code and message a client sees."""
    if not isinstance(exc, MocError):
        # Unexpected bugs: log the detail here, show the client nothing internal.
        log.error("internal error while serving a request", exc_info=exc)
        return ErrorReply(500, "internal_error", "internal error")
    status = STATUS_BY_CODE.get(exc.code) or next(
        (STATUS[cls] for cls in type(exc).__mro__ if cls in STATUS), 500
    )
    retry_after: float | None = None
    if isinstance(exc, Overloaded):
        retry_after = exc.retry_after
    elif isinstance(exc, ShuttingDown):
        retry_after = SHUTDOWN_RETRY_AFTER_S
    if status == 503 and retry_after is None:
        retry_after = 1.0  # worth a retry soon: another holder, or a primary, will be there
    field = exc.field if isinstance(exc, InvalidRequest) else None
    message = str(exc) or exc.code
    if 400 <= status < 500 and status != 499:
        # The client's mistake: one line, no traceback (a 5xx that is a MocError is logged where
        # it happened; a bug is logged above).
        log.info("refused a request: %d %s: %s", status, exc.code, message)
    return ErrorReply(status, exc.code, message, field, retry_after)
