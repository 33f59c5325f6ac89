"""Model backends as the worker process sees them: load once, then serve one request at a time.

This module holds what every backend shares (the request, the outcome, the errors, the model's
Protocol); `loader.py` picks the backend for a `LoadSpec`. Each backend module imports its heavy
library (llama_cpp, torch) only when a model is loaded, so the worker pays for the one it uses
and the node process pays for none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from actors.types import ChatMessage, FinishReason, GenerationParams, TensorData
from actors.worker.protocol import Infer, LoadSpec


@dataclass(frozen=True, slots=True)
class Generation:
    """One request as a backend receives it: exactly one of prompt, messages, tensors is set.

    The sampling parameters and their defaults are the request's own (`GenerationParams`).
    """

    prompt: str | tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tensors: tuple[TensorData, ...] | None = None
    params: GenerationParams = field(default_factory=GenerationParams)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a backend produced for one request."""

    text: str
    tokens_generated: int
    prompt_tokens: int
    finish_reason: FinishReason
    tensors: tuple[TensorData, ...] | None = None


class BackendError(Exception):
    """The backend could not load the model; the message says why, for the operator."""


class BadRequest(Exception):
    """The request is invalid for this model; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class LoadedModel(Protocol):
    """A model loaded in this process."""

    @property
    def version(self) -> str:
        """Identify the weights (name and a digest of the file's identity)."""
        ...

    @property
    def n_ctx(self) -> int:
        """Return the context length in tokens (0 for tensor models)."""
        ...

    def run(
        self, gen: Generation, emit: Callable[[str], None], should_stop: Callable[[], bool]
    ) -> Outcome:
        """Serve one request, passing text through `emit` as it is produced.

        `should_stop` is polled between tokens; when it turns true the backend returns at once
        with finish_reason "cancelled".
        """
        ...

    def set_threads(self, n_threads: int) -> None:
        """Compute the next requests with `n_threads` CPU threads."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...


def generation_of(msg: Infer) -> Generation:
    """Take a request off the wire (where every field is set) for the backend."""
    params = GenerationParams(
        msg.max_tokens,
        msg.temperature,
        msg.top_p,
        msg.stop,
        msg.seed,
        msg.presence_penalty,
        msg.frequency_penalty,
        msg.repeat_penalty,
        msg.logit_bias,
        msg.json_schema,
        msg.logprobs,
    )
    return Generation(msg.prompt, msg.messages, msg.tensors, params)


def check_generation(gen: Generation) -> None:
    """Refuse parameters no backend can honour; BadRequest names the field."""
    given = [name for name in ("prompt", "messages", "tensors") if getattr(gen, name) is not None]
    if len(given) != 1:
        raise BadRequest(
            "prompt", f"exactly one of prompt, messages, tensors is needed, got {given or 'none'}"
        )
    if gen.tensors is None:
        p = gen.params
        if p.max_tokens < 1:
            raise BadRequest("max_tokens", f"must be at least 1, got {p.max_tokens}")
        if not 0.0 <= p.temperature <= 100.0:
            raise BadRequest("temperature", f"must be between 0 and 100, got {p.temperature}")
        if not 0.0 <= p.top_p <= 1.0:
            raise BadRequest("top_p", f"must be between 0 and 1, got {p.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(p, name) <= 2.0:
                raise BadRequest(name, f"must be between -2 and 2, got {getattr(p, name)}")
        if not 0.0 < p.repeat_penalty <= 10.0:
            raise BadRequest("repeat_penalty", f"must be in (0, 10], got {p.repeat_penalty}")
        if any(not -100.0 <= bias <= 100.0 for _, bias in p.logit_bias):
            raise BadRequest("logit_bias", "every bias must be between -100 and 100")
        if isinstance(gen.prompt, tuple) and not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in gen.prompt
        ):
            raise BadRequest("prompt", "token ids must be non-negative integers")
        if p.logprobs is not None and not 0 <= p.logprobs <= 20:
            raise BadRequest("logprobs", f"must be between 0 and 20, got {p.logprobs}")


def file_version(path: str, label: str) -> str:
    """Build a version string from a label and the file's size and mtime (cheap, no hashing)."""
    st = os.stat(path)
    digest = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{label}@{digest}"


__all__ = [
    "BackendError",
    "BadRequest",
    "Generation",
    "LoadSpec",  # the wire's LoadSpec, which is also what a backend loads
    "LoadedModel",
    "Outcome",
    "check_generation",
    "file_version",
    "generation_of",
]
