"""Start a real worker process and run requests through the one path production takes.

`run_request` opens a `WorkerChannel` (the worker's Unix socket, read from an event loop) for each
request, as the serving lane does, so a synchronous test drives exactly the production code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.types import GenerationParams, InferRequest, InferResult
from actors.worker.client import WorkerProcess
from actors.worker.handle import WorkerSpec
from actors.worker.protocol import LoadSpec

PROMPT = "The quick brown fox"


def greedy(max_tokens: int, stop: tuple[str, ...] = ()) -> GenerationParams:
    """Parameters for reproducible text: always the likeliest token."""
    return GenerationParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=stop)


def worker_for(
    path: Path,
    runtime_dir: Path,
    name: str = "w",
    backend: str = "gguf",
    *,
    huge_pages: bool = False,
    **load: Any,
) -> WorkerProcess:
    """Return an unstarted worker for the model at `path` (`load`: LoadSpec's other fields)."""
    spec = LoadSpec(backend, str(path), **load)  # type: ignore[arg-type]
    return WorkerProcess(WorkerSpec(name, spec, huge_pages=huge_pages), runtime_dir=runtime_dir)


def start_worker(path: Path, runtime_dir: Path, name: str = "w", **load: Any) -> WorkerProcess:
    """Start a worker on the model at `path` and return it once loaded."""
    worker = worker_for(path, runtime_dir, name, **load)
    worker.start(timeout=120)
    return worker


def run_request(
    worker: WorkerProcess,
    req: InferRequest,
    *,
    on_token: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
) -> InferResult:
    """Run one request through a channel to `worker`; stream its pieces when `on_token` is given.

    Whatever `on_token` raises leaves the stream, which cancels the request in the worker, and
    is raised here. `timeout_s` is the request's deadline from now.
    """
    return asyncio.run(_run(worker, req, on_token, timeout_s))


async def _run(
    worker: WorkerProcess,
    req: InferRequest,
    on_token: Callable[[str], None] | None,
    timeout_s: float | None,
) -> InferResult:
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    channel = worker.open_channel()
    try:
        if on_token is None:
            return await channel.infer(req, deadline)
        async with contextlib.aclosing(channel.stream(req, deadline)) as items:
            async for item in items:
                if isinstance(item, InferResult):
                    return item
                on_token(item)
        raise AssertionError("the stream ended without a result")
    finally:
        channel.close()
