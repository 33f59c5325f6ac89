"""The errors of the learning package; each is a MocError so the transports map it once."""

from __future__ import annotations

from actors.errors import InvalidRequest, MocError


class LearningError(MocError):
    """Base of the learning package's errors."""

    code = "learning_error"


class InvalidJobSpec(InvalidRequest):
    """A job spec field is missing, of the wrong type or out of range."""

    code = "invalid_job_spec"


class DatasetInvalid(InvalidRequest):
    """A dataset line is not valid JSON or lacks a field its job type needs."""

    code = "dataset_invalid"

    def __init__(self, path: str, line: int, field: str, message: str) -> None:
        where = f"{path} line {line}" if line else path
        super().__init__(field, f"{where}: {message}")
        self.path = path
        self.line = line


class DatasetNotAllowed(LearningError):
    """A dataset path lies outside the configured dataset directories."""

    code = "dataset_not_allowed"


class UnsupportedModel(LearningError):
    """The base model's architecture or tensor types cannot be trained here."""

    code = "unsupported_model"


class JobNotFound(LearningError):
    """No job has this id."""

    code = "job_not_found"


class JobMemoryUnavailable(LearningError):
    """The job could not claim the memory it needs before its deadline."""

    code = "insufficient_memory"
