"""A catalog model with `parallel = 4` serves four requests at once through a real Node.

Real actors and a real llama.cpp worker on a generated model, driven through `Node.infer_stream`,
the call both fronts make.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.gguf_synth import write_preset
from actors.serving.config import CatalogEntry
from actors.types import InferRequest, InferResult
from moc_node.app import Runtime, build_runtime
from tests.actors.worker.workers import greedy
from tests.moc_node.conftest import make_config
from tests.support import wait_for

MODEL = "slots"
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, world"]


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    root = tmp_path / "models"
    root.mkdir()
    path = write_preset(root / "small.gguf", "small", seed=2)
    entry = CatalogEntry(name=MODEL, path=str(path), n_ctx=256, preload=True, parallel=4)
    built = build_runtime(make_config(tmp_path / "node", root, catalog=(entry,)))
    await built.node.start()
    yield built
    await built.close()


def in_flight(runtime: Runtime) -> int:
    return next(m.in_flight for m in runtime.node.models() if m.name == MODEL)


async def stream(
    runtime: Runtime, prompt: str, arrivals: list[tuple[str, float]]
) -> InferResult:
    req = InferRequest(model=MODEL, prompt=prompt, params=greedy(24))
    async for item in runtime.node.infer_stream(req):
        if isinstance(item, InferResult):
            return item
        arrivals.append((prompt, time.monotonic()))
    raise AssertionError("the stream ended without a result")


async def test_four_concurrent_streams_are_decoded_together_and_equal_each_run_alone(
    runtime: Runtime,
) -> None:
    alone = [await stream(runtime, p, []) for p in PROMPTS]
    arrivals: list[tuple[str, float]] = []
    # The worker is stopped while the four are sent, so none can finish (24 tokens of the small
    # model take milliseconds) before the others have arrived; then it decodes them together.
    (pid,) = [m.pid for m in runtime.node.models() if m.name == MODEL]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        streams = [asyncio.ensure_future(stream(runtime, p, arrivals)) for p in PROMPTS]
        await wait_for(lambda: in_flight(runtime) == len(PROMPTS), 10, "four requests admitted")
    finally:
        os.kill(pid, signal.SIGCONT)
    together = await asyncio.gather(*streams)
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.tokens_generated == 24 for r in together)
    first = [min(t for p, t in arrivals if p == prompt) for prompt in PROMPTS]
    last = [max(t for p, t in arrivals if p == prompt) for prompt in PROMPTS]
    assert max(first) < min(last)  # every stream had begun before any had ended
