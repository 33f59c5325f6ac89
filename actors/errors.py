"""The domain errors of the actors package.

Every error a client can cause or meet has its own class, so the transports can map it to a
status code once (`transports/errors.py`) instead of parsing messages.
"""

from __future__ import annotations


class MocError(Exception):
    """Base of every error moc-node reports to a client."""

    code = "internal_error"


class InvalidRequest(MocError):
    """A request field is missing, of the wrong type or out of range."""

    code = "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(MocError):
    """The model is neither loaded nor in the catalog."""

    code = "model_not_found"


class ModelAlreadyLoaded(MocError):
    """A load was asked for a model that is already loaded."""

    code = "model_already_loaded"


class ModelNotLoaded(MocError):
    """An unload or a request was aimed at a model that is not loaded."""

    code = "model_not_loaded"


class PathNotAllowed(MocError):
    """A model path lies outside the configured model directories."""

    code = "path_not_allowed"


class InsufficientMemory(MocError):
    """The model does not fit on any device, even after evicting every idle model."""

    code = "insufficient_memory"


class Overloaded(MocError):
    """The model's bulkhead is full; retry after `retry_after` seconds."""

    code = "overloaded"

    def __init__(self, message: str = "overloaded", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpen(Overloaded):
    """The model's worker keeps failing; its circuit breaker refuses calls for a while."""

    code = "circuit_open"


class ShuttingDown(MocError):
    """The node is draining and takes no new requests."""

    code = "shutting_down"


class ModelLoadFailed(MocError):
    """The worker process could not load the model."""

    code = "model_load_failed"


class WorkerCrashed(MocError):
    """The model's worker process died while serving the request."""

    code = "worker_crashed"


class RequestTimeout(MocError):
    """The request did not finish within its deadline."""

    code = "timeout"


class Cancelled(MocError):
    """The request was cancelled by its client."""

    code = "cancelled"


class FeatureUnavailable(MocError):
    """The feature is not enabled on this node (e.g. learning without torch installed)."""

    code = "not_available"


class ModelFileInvalid(MocError):
    """The model file is not one this node can read: not a GGUF, truncated, or implausible."""

    code = "model_file_invalid"


class NameTaken(InvalidRequest):
    """A name a client chose for something new already names a model (or a pending output)."""

    code = "name_taken"


class StateNotWritable(MocError):
    """The state store could not record this request's outcome; the request is undone."""

    code = "state_not_writable"
