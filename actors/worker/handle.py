"""What serving needs from a worker: the seam the ModelActor and the lane are built on.

`WorkerProcess` (actors/worker/client.py) is the real worker and `WorkerChannel`
(actors/worker/channel.py) its real request channel; serving's tests hand in fakes that satisfy
these Protocols (no process, no socket). A `WorkerFactory` makes one worker per start: a worker
that died is replaced, never restarted.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from actors.errors import WorkerCrashed
from actors.types import EmbedRequest, EmbedResult, InferRequest, InferResult
from actors.worker.protocol import Loaded, LoadSpec


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One worker to start: the model it loads, the name it answers to in messages and file
    names (the model's name; the worker itself never hears it), and whether its process starts
    asking for transparent huge pages (`[resources] huge_pages`; a process's allocator reads
    that at its start, so it cannot be a part of the load)."""

    name: str
    load: LoadSpec
    huge_pages: bool = False


class RequestChannel(Protocol):
    """Requests from the event loop to one worker; made by `WorkerHandle.open_channel`."""

    @property
    def closed(self) -> WorkerCrashed | None:
        """Why the channel takes no more requests (its worker died or it was closed), else None."""
        ...

    async def infer(self, req: InferRequest, deadline: float | None = None) -> InferResult:
        """Run one whole request; `deadline` is monotonic (the event loop's clock)."""
        ...

    def stream(
        self, req: InferRequest, deadline: float | None = None
    ) -> AsyncGenerator[str | InferResult, None]:
        """Yield the request's text piece by piece, then its result."""
        ...

    async def embed(self, req: EmbedRequest, deadline: float | None = None) -> EmbedResult:
        """Embed the request's inputs; `deadline` is monotonic (the event loop's clock)."""
        ...

    def close(self) -> None:
        """Fail what is in flight and let go of the connection (not of the worker)."""
        ...


class WorkerHandle(Protocol):
    """One worker process as its supervisor sees it.

    `start` and `open_channel` are called once each, from the supervising thread and the event
    loop respectively; `stop`, `kill`, `alive`, `pid` and `peak_memory_mb` from any thread.
    """

    @property
    def pid(self) -> int | None:
        """The worker's process id once started, else None."""
        ...

    @property
    def alive(self) -> bool:
        """Whether the worker process is running."""
        ...

    @property
    def peak_memory_mb(self) -> float | None:
        """The most memory (MiB) the worker reported, at load or after a request."""
        ...

    def start(self, timeout: float = 300.0) -> Loaded:
        """Start the worker and load its model; raise ModelLoadFailed saying why not."""
        ...

    def open_channel(self) -> RequestChannel:
        """Open a request channel to the started worker (on the running event loop)."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, kill it after `timeout`, reap it. Safe to call twice."""
        ...

    def set_threads(self, n_threads: int) -> bool:
        """Tell the loaded model to compute with `n_threads` CPU threads; False if no worker
        takes it (not started, loading, or stopped)."""
        ...

    def kill(self) -> None:
        """Kill the worker at once and reap it."""
        ...


WorkerFactory = Callable[[WorkerSpec, Path], WorkerHandle]
"""Make the worker for a spec, with its sockets and log under the runtime directory."""


__all__ = ["RequestChannel", "WorkerFactory", "WorkerHandle", "WorkerSpec"]
