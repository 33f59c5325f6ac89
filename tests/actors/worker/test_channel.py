"""The event loop's channel to a real worker process: many requests in flight, answered by id."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.errors import InvalidRequest, RequestTimeout, WorkerCrashed
from actors.types import EmbedRequest, InferRequest, InferResult
from actors.worker.channel import WorkerChannel
from actors.worker.client import WorkerProcess
from tests.actors.worker.workers import PROMPT, greedy, start_worker
from tests.support import wait_for


def request(prompt: str = PROMPT, max_tokens: int = 8) -> InferRequest:
    return InferRequest(model="tiny", prompt=prompt, params=greedy(max_tokens))


def start(path: Path, runtime_dir: Path, name: str = "tiny") -> WorkerProcess:
    return start_worker(path, runtime_dir, name, n_ctx=512, n_threads=1)


@pytest.fixture
async def channel(tiny_gguf: Path, runtime_dir: Path) -> AsyncIterator[WorkerChannel]:
    worker = await asyncio.to_thread(start, tiny_gguf, runtime_dir)
    ch = worker.open_channel()
    yield ch
    ch.close()
    await asyncio.to_thread(worker.stop)


async def test_requests_in_flight_at_once_each_get_their_own_greedy_answer(
    channel: WorkerChannel,
) -> None:
    prompts = [f"{PROMPT} {i}" for i in range(12)]
    # The same requests one at a time: the reference.
    expected = [(await channel.infer(request(p))).text for p in prompts]
    results = await asyncio.gather(*(channel.infer(request(p)) for p in prompts))
    assert [r.text for r in results] == expected
    assert all(r.tokens_generated == 8 for r in results)
    assert channel.unanswered == 0


async def test_streamed_pieces_concatenate_to_the_whole_text(channel: WorkerChannel) -> None:
    whole = await channel.infer(request(max_tokens=12))
    pieces: list[str] = []
    result: InferResult | None = None
    async for item in channel.stream(request(max_tokens=12)):
        if isinstance(item, InferResult):
            result = item
        else:
            pieces.append(item)
    assert result is not None and result.text == whole.text == "".join(pieces)


async def test_a_caller_that_leaves_cancels_its_request_in_the_worker(
    channel: WorkerChannel,
) -> None:
    long = asyncio.create_task(channel.infer(request(max_tokens=400)))
    queued = asyncio.create_task(channel.infer(request(max_tokens=400)))
    await wait_for(lambda: channel.unanswered == 2, 10, "both requests to be sent")
    queued.cancel()  # still waiting in the worker's queue: it never starts
    long.cancel()  # running: stopped between tokens
    for task in (long, queued):
        with pytest.raises(asyncio.CancelledError):
            await task
    after = await channel.infer(request(max_tokens=2))
    assert after.tokens_generated == 2
    assert channel.unanswered == 0


async def test_a_passed_deadline_raises_request_timeout_and_the_next_request_is_served(
    channel: WorkerChannel,
) -> None:
    with pytest.raises(RequestTimeout):
        await channel.infer(request(max_tokens=400), deadline=time.monotonic())
    assert (await channel.infer(request(max_tokens=3))).tokens_generated == 3


async def test_a_bad_request_fails_alone(channel: WorkerChannel) -> None:
    too_long = request(prompt="word " * 2000)
    good = channel.infer(request(max_tokens=2))
    bad = channel.infer(too_long)
    outcomes = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(outcomes[0], InvalidRequest)
    assert isinstance(outcomes[1], InferResult) and outcomes[1].tokens_generated == 2


async def test_kill_9_fails_every_request_in_flight_with_worker_crashed(
    small_gguf: Path, runtime_dir: Path
) -> None:
    worker = await asyncio.to_thread(start, small_gguf, runtime_dir, "victim")
    ch = worker.open_channel()
    try:
        first_token = asyncio.Event()

        async def watch() -> None:
            async for _ in ch.stream(request(max_tokens=1000)):
                first_token.set()

        streaming = asyncio.create_task(watch())
        await wait_for(lambda: ch.unanswered == 1, 10, "the stream to be sent")
        # Queued in the worker behind the stream.
        tasks = [asyncio.create_task(ch.infer(request(max_tokens=1000))) for _ in range(3)]
        await asyncio.wait_for(first_token.wait(), 60)  # the worker is busy on one of them
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*tasks, streaming, return_exceptions=True), 10
        )
        assert all(isinstance(o, WorkerCrashed) for o in outcomes), outcomes
        assert "signal 9" in str(outcomes[0])
        with pytest.raises(WorkerCrashed):  # a dead worker takes nothing new
            await ch.infer(request())
    finally:
        ch.close()
        await asyncio.to_thread(worker.stop)


async def test_a_closed_channel_fails_its_requests_and_a_new_channel_is_served(
    channel: WorkerChannel,
) -> None:
    worker = channel.worker
    queued = [asyncio.create_task(channel.infer(request(max_tokens=400))) for _ in range(4)]
    await wait_for(lambda: channel.unanswered == 4, 10, "the four requests to be sent")
    channel.close()
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, WorkerCrashed) for o in outcomes), outcomes
    fresh = worker.open_channel()
    try:
        assert (await fresh.infer(request(max_tokens=2))).tokens_generated == 2
        assert worker.alive
    finally:
        fresh.close()


async def test_garbage_on_a_data_link_closes_that_link_only(channel: WorkerChannel) -> None:
    rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rogue.connect(channel.worker.data_socket)
    rogue.sendall(struct.pack("<I", 3) + b"abc")
    rogue.settimeout(30)
    assert rogue.recv(16) == b""  # the worker closed it
    rogue.close()
    assert (await channel.infer(request(max_tokens=2))).tokens_generated == 2


async def test_a_request_larger_than_the_socket_buffer_arrives_whole(
    channel: WorkerChannel,
) -> None:
    # Far past the kernel's socket buffer: the first send is partial, the rest goes out when
    # the socket turns writable, and the frame still decodes in the worker.
    huge = request(prompt="word " * 150_000)
    small = channel.infer(request(max_tokens=2))
    outcomes = await asyncio.gather(channel.infer(huge), small, return_exceptions=True)
    assert isinstance(outcomes[0], InvalidRequest) and "context holds" in str(outcomes[0])
    assert isinstance(outcomes[1], InferResult) and outcomes[1].tokens_generated == 2


async def test_a_channel_to_a_worker_gone_fails_its_requests_instead_of_its_creation(
    tiny_gguf: Path, runtime_dir: Path
) -> None:
    worker = await asyncio.to_thread(start, tiny_gguf, runtime_dir, "gone")
    await asyncio.to_thread(worker.stop)
    ch = worker.open_channel()  # the lane builds one and lets the request fail through it
    try:
        with pytest.raises(WorkerCrashed, match="cannot reach"):
            await ch.infer(request())
        assert ch.closed is not None
    finally:
        ch.close()


async def test_an_embed_between_generations_answers_a_unit_vector_per_input(
    channel: WorkerChannel,
) -> None:
    streaming = asyncio.ensure_future(channel.infer(request(max_tokens=64)))
    result = await channel.embed(EmbedRequest("tiny", ("hello", "hello", "other text")))
    first, again, other = (struct.unpack("<64f", v) for v in result.vectors)
    assert math.isclose(math.fsum(v * v for v in first), 1.0, rel_tol=1e-5)
    assert max(abs(a - b) for a, b in zip(first, again, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(first, other, strict=True)) > 0.01
    assert result.prompt_tokens > 3
    assert (await streaming).tokens_generated == 64  # the generation went on around it


async def test_an_input_past_the_context_is_refused_naming_it(channel: WorkerChannel) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await channel.embed(EmbedRequest("tiny", ("ok", "x" * 600)))
    assert caught.value.field == "input[1]"
    assert (await channel.embed(EmbedRequest("tiny", ("still serving",)))).vectors
