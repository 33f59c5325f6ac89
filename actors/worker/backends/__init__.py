"""Model backends as the worker process sees them: load once, then serve one request at a time.

Each backend module imports its heavy library (llama_cpp, torch) only when a model is loaded, so
the worker pays for the one it uses and the node process pays for none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from actors.types import ChatMessage, FinishReason, TensorData


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to load and where; `n_threads` 0 lets the backend choose.

    `cpu_repack` lets llama.cpp repack CPU-resident GGUF weights into its CPU-specific layouts
    (its "extra buffer types", AMX among them); off, they stay as the file has them. See
    `[models] cpu_repack` in actors/serving/config.py for why it is off by default.
    """

    backend: str
    path: str
    n_ctx: int = 2048
    gpu_layers: int = 0
    on_gpu: bool = False
    device_index: int | None = None
    seed: int = 0
    lora_path: str | None = None
    n_threads: int = 0
    cpu_repack: bool = False


@dataclass(frozen=True, slots=True)
class Generation:
    """One request as a backend receives it: exactly one of prompt, messages, tensors is set."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tensors: tuple[TensorData, ...] | None = None
    max_tokens: int = 50
    temperature: float = 0.7
    top_p: float = 0.9
    stop: tuple[str, ...] = ()
    seed: int | None = None


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

    def close(self) -> None:
        """Release the model's memory."""
        ...


def load_model(spec: LoadSpec) -> LoadedModel:
    """Load `spec` with its backend; raise BackendError with a useful message on failure."""
    if spec.backend == "gguf":
        from actors.worker.backends.gguf import GgufModel

        return GgufModel.load(spec)
    if spec.backend == "torch":
        from actors.worker.backends.torch import TorchModel

        return TorchModel.load(spec)
    raise BackendError(f"unknown backend {spec.backend!r} (expected 'gguf' or 'torch')")


def prepare_crash_reports(backend: str) -> int | None:
    """Ready `backend`'s native library for crash reports in this (worker) process.

    Return the address of a C function `void f(void)` that prints the calling thread's native
    stack, for a fatal-signal handler (actors/worker/native_crash.py), or None when the backend has none.
    """
    if backend == "gguf":
        from actors.worker.backends.gguf import prepare_crash_reports as gguf_crash_reports

        return gguf_crash_reports()
    return None


def check_model_file(spec: LoadSpec) -> None:
    """Check the file's format cheaply, before the backend's library is imported."""
    if spec.backend == "gguf":
        from actors.worker.backends.gguf import check_gguf_file

        check_gguf_file(spec.path)
    elif spec.backend == "torch":
        from actors.worker.backends.torch import check_torch_file

        check_torch_file(spec.path)
    else:
        raise BackendError(f"unknown backend {spec.backend!r} (expected 'gguf' or 'torch')")


def file_version(path: str, label: str) -> str:
    """Build a version string from a label and the file's size and mtime (cheap, no hashing)."""
    import hashlib
    import os

    st = os.stat(path)
    digest = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{label}@{digest}"
