"""Pick the backend a `LoadSpec` names: check its file, ready its crash reports, load it.

Apart from the shared types (actors/worker/backends/__init__.py) so that the backends, which
import those types, and this module, which imports the backends, draw no circle.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from actors.worker.backends import BackendError, LoadedModel
from actors.worker.backends.threads import physical_cores
from actors.worker.protocol import LoadSpec

if TYPE_CHECKING:
    from actors.worker.backends.gguf_engine import GgufEngine

_UNKNOWN = "unknown backend {!r} (expected 'gguf' or 'torch')"


def load_model(spec: LoadSpec) -> LoadedModel | GgufEngine:
    """Load `spec` with its backend; raise BackendError with a useful message on failure.

    A GGUF model is the batching engine, with `parallel` slots (one: requests one after
    another, on the same code), its LoRA adapter applied when the spec names one.
    """
    if spec.backend == "gguf" and spec.n_threads <= 0:
        # llama.cpp's own choice, which neither llama.cpp's context default (4) nor
        # llama-cpp-python's (half the logical CPUs) is: see backends/threads.py.
        spec = dataclasses.replace(spec, n_threads=physical_cores())
    if spec.backend == "gguf":
        from actors.worker.backends.gguf_engine import GgufEngine

        return GgufEngine.load(spec, parallel=max(spec.parallel, 1))
    if spec.backend == "torch":
        from actors.worker.backends.torch import TorchModel

        return TorchModel.load(spec)
    raise BackendError(_UNKNOWN.format(spec.backend))


def prepare_crash_reports(backend: str) -> int | None:
    """Ready `backend`'s native library for crash reports in this (worker) process.

    Return the address of a C function `void f(void)` that prints the calling thread's native
    stack, for a fatal-signal handler (actors/worker/native_crash.py), or None when the backend
    has none.
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
        raise BackendError(_UNKNOWN.format(spec.backend))
