"""A worker loaded with `parallel` slots serves its requests together (actors/worker/batching.py).

Real worker processes, real llama.cpp, generated models; each request on its own channel, as
the serving lane sends them, all from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.errors import InvalidRequest, WorkerCrashed
from actors.types import ChatMessage, InferRequest, InferResult
from actors.worker.channel import infer_message
from actors.worker.client import WorkerProcess
from actors.worker.protocol import FrameReader, Token, frame_bytes
from tests.actors.worker.workers import greedy, run_request, worker_for

N_CTX = 256
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello, world"]

Arrival = tuple[int, float]  # (request index, when a piece arrived)


@pytest.fixture(scope="module")
def engine_worker(
    small_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One worker with 4 slots on the small model, shared by the tests that leave it running."""
    runtime = tmp_path_factory.mktemp("rt", numbered=True)
    w = worker_for(small_gguf, Path(runtime), "slots", n_ctx=N_CTX, n_threads=1, parallel=4)
    w.start(timeout=120)
    yield w
    w.stop()


def request(prompt: str, max_tokens: int = 24) -> InferRequest:
    return InferRequest(model="slots", prompt=prompt, params=greedy(max_tokens))


async def _one(
    worker: WorkerProcess,
    index: int,
    req: InferRequest,
    arrivals: list[Arrival],
    on_piece: Callable[[int, int], None],
) -> InferResult:
    """Stream one request on its own channel; `on_piece(index, count)` may raise to leave."""
    channel = worker.open_channel()
    count = 0
    try:
        async with contextlib.aclosing(channel.stream(req)) as items:
            async for item in items:
                if isinstance(item, InferResult):
                    return item
                arrivals.append((index, time.monotonic()))
                count += 1
                on_piece(index, count)
        raise AssertionError("the stream ended without a result")
    finally:
        channel.close()


def run_together(
    worker: WorkerProcess,
    reqs: list[InferRequest],
    on_piece: Callable[[int, int], None] = lambda _i, _n: None,
) -> tuple[list[InferResult | BaseException], list[Arrival]]:
    """Run `reqs` at once, streaming; return each one's result (or error) and piece arrivals."""
    arrivals: list[Arrival] = []

    async def main() -> list[InferResult | BaseException]:
        runs = [_one(worker, i, r, arrivals, on_piece) for i, r in enumerate(reqs)]
        return await asyncio.gather(*runs, return_exceptions=True)

    return asyncio.run(main()), arrivals


def texts(results: list[InferResult | BaseException]) -> list[str]:
    out = []
    for result in results:
        assert isinstance(result, InferResult), result
        out.append(result.text)
    return out


def test_four_concurrent_greedy_requests_interleave_and_equal_each_request_run_alone(
    engine_worker: WorkerProcess,
) -> None:
    alone = [run_request(engine_worker, request(p)).text for p in PROMPTS]
    results, arrivals = run_together(engine_worker, [request(p) for p in PROMPTS])
    assert texts(results) == alone
    assert all(isinstance(r, InferResult) and r.tokens_generated == 24 for r in results)
    # Decoded together: every request had its first piece before any had its last.
    first = {i: min(t for j, t in arrivals if j == i) for i in range(len(PROMPTS))}
    last = {i: max(t for j, t in arrivals if j == i) for i in range(len(PROMPTS))}
    assert max(first.values()) < min(last.values())


def test_streamed_pieces_concatenate_to_each_requests_text(engine_worker: WorkerProcess) -> None:
    results, _ = run_together(engine_worker, [request(p, 16) for p in PROMPTS[:3]])
    for i, p in enumerate(PROMPTS[:3]):
        streamed: list[str] = []
        result = run_request(engine_worker, request(p, 16), on_token=streamed.append)
        assert "".join(streamed) == result.text == texts(results)[i]


class Leave(Exception):
    """Raised from a token callback: the client leaves its stream, which cancels the request."""


def test_cancelling_one_stream_mid_way_leaves_the_others_unchanged(
    engine_worker: WorkerProcess,
) -> None:
    alone = [run_request(engine_worker, request(p, 48)).text for p in PROMPTS[:3]]

    def leave_second(index: int, count: int) -> None:
        if index == 1 and count == 3:
            raise Leave

    results, _ = run_together(engine_worker, [request(p, 48) for p in PROMPTS[:3]], leave_second)
    assert isinstance(results[1], Leave)
    kept = [r for r in results if isinstance(r, InferResult)]
    assert kept == [results[0], results[2]]  # only the one that left is missing
    assert [r.text for r in kept] == [alone[0], alone[2]]
    # Its slot is free again: four more requests all complete.
    again, _ = run_together(engine_worker, [request(p, 4) for p in PROMPTS])
    assert all(isinstance(r, InferResult) and r.tokens_generated == 4 for r in again)


def test_chat_messages_render_with_the_template_as_the_one_at_a_time_worker_does(
    engine_worker: WorkerProcess, small_gguf: Path, runtime_dir: Path
) -> None:
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there"))
    chat = InferRequest(model="slots", messages=messages, params=greedy(16))
    single = worker_for(small_gguf, runtime_dir, "single", n_ctx=N_CTX, n_threads=1)
    single.start(timeout=120)
    try:
        expected = run_request(single, chat)
    finally:
        single.stop()
    results, _ = run_together(engine_worker, [chat, chat])
    for result in results:
        assert isinstance(result, InferResult)
        assert result.prompt_tokens == expected.prompt_tokens
        assert result.text == expected.text


def test_a_prompt_longer_than_a_slot_is_an_invalid_request_and_the_worker_serves_on(
    engine_worker: WorkerProcess,
) -> None:
    with pytest.raises(InvalidRequest, match="context holds") as err:
        run_request(engine_worker, request("x" * (N_CTX + 10)))
    assert err.value.field == "prompt"
    assert run_request(engine_worker, request(PROMPTS[0], 2)).tokens_generated == 2


def test_killing_the_worker_fails_exactly_the_requests_in_flight(
    small_gguf: Path, runtime_dir: Path
) -> None:
    w = worker_for(small_gguf, runtime_dir, "victim", n_ctx=N_CTX, n_threads=1, parallel=4)
    w.start(timeout=120)
    pid = w.pid
    assert pid is not None
    done_before = run_request(w, request(PROMPTS[0], 2))  # answered before: stays answered

    def kill_once_all_stream(_index: int, _count: int) -> None:
        if pid is not None and _count == 2:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    try:
        results, _ = run_together(w, [request(p, 200) for p in PROMPTS], kill_once_all_stream)
    finally:
        w.stop()
    assert done_before.tokens_generated == 2
    assert len(results) == 4
    for result in results:
        assert isinstance(result, WorkerCrashed), result


def test_a_data_link_that_closes_cancels_its_requests_and_frees_their_slots(
    tiny_gguf: Path, runtime_dir: Path
) -> None:
    """Two long requests fill both slots from a raw link that then closes, sending no Cancel.

    A short request after that is served at once: measured against one long request run
    alone (the time the short one would wait if the closed link's requests still ran).
    """
    long_tokens = 1900
    w = worker_for(tiny_gguf, runtime_dir, "drop", n_ctx=2048, n_threads=1, parallel=2)
    w.start(timeout=120)
    try:
        started = time.monotonic()
        run_request(w, InferRequest(model="drop", prompt="a", params=greedy(long_tokens)))
        long_alone = time.monotonic() - started
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(w.data_socket)
            for rid in (1, 2):
                long_req = InferRequest(model="drop", prompt="ab", params=greedy(long_tokens))
                raw.sendall(frame_bytes(infer_message(rid, long_req, stream=True)))
            reader = FrameReader()
            streaming: set[int] = set()
            while streaming != {1, 2}:  # both hold a slot and decode
                streaming |= {
                    m.request_id for m in reader.feed(raw.recv(65536)) if isinstance(m, Token)
                }
        started = time.monotonic()
        short = run_request(w, InferRequest(model="drop", prompt="b", params=greedy(4)))
        waited = time.monotonic() - started
    finally:
        w.stop()
    assert short.tokens_generated == 4
    assert waited < long_alone / 2, (
        f"short request took {waited:.2f} s, a long one {long_alone:.2f} s"
    )


GATED_DECODE = """
    import os, time
    import llama_cpp.llama_cpp as lib

    _decode = lib.llama_decode
    _gate = os.environ["MOC_TEST_DECODE_GATE"]

    def gated(ctx, batch):  # while the file "hold" exists, a decode waits (saying so) before it runs
        if os.path.exists(_gate + "/hold"):
            open(_gate + "/inside", "w").close()
            while os.path.exists(_gate + "/hold"):
                time.sleep(0.002)
        return _decode(ctx, batch)

    lib.llama_decode = gated
"""


def test_during_a_decode_a_request_whose_prompt_is_cached_is_answered_before_it_ends(
    small_gguf: Path, runtime_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, gate = tmp_path / "hook", tmp_path / "gate"
    hook.mkdir()
    gate.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(GATED_DECODE))
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("MOC_TEST_DECODE_GATE", str(gate))
    worker = worker_for(small_gguf, runtime_dir, "gated", n_ctx=N_CTX, n_threads=1, parallel=3)
    worker.start(timeout=120)
    try:
        first = run_request(worker, request(PROMPTS[0], 1))  # slot 0 keeps it, logits and all

        async def main() -> tuple[InferResult, list[InferResult], int]:
            tokens: list[str] = []
            started = [asyncio.Event(), asyncio.Event()]

            async def stream(prompt: str, started: asyncio.Event) -> InferResult:
                channel = worker.open_channel()
                try:
                    async for item in channel.stream(request(prompt, 8)):
                        if isinstance(item, InferResult):
                            return item
                        tokens.append(item)
                        started.set()
                finally:
                    channel.close()
                raise AssertionError("no result")

            channel = worker.open_channel()  # open before: a new connection waits for the step
            streams = [
                asyncio.create_task(stream(p, e))
                for p, e in zip(PROMPTS[1:3], started, strict=True)
            ]
            for event in started:
                await event.wait()
            # The streams' next decode (slots 1 and 2: two tokens, so a thread works beside it)
            # holds until we let it go.
            (gate / "hold").touch()
            while not (gate / "inside").exists():
                await asyncio.sleep(0.005)
            held = len(tokens)
            try:
                a = await asyncio.wait_for(channel.infer(request(PROMPTS[0], 1)), 10)
            finally:
                channel.close()
            during = len(tokens) - held
            (gate / "hold").unlink()
            return a, list(await asyncio.gather(*streams)), during

        again, results, tokens_meanwhile = asyncio.run(main())
    finally:
        with contextlib.suppress(FileNotFoundError):
            (gate / "hold").unlink()
        alone = [run_request(worker, request(p, 8)).text for p in PROMPTS[1:3]]
        worker.stop()
    assert again.text == first.text and again.prompt_tokens_reused == again.prompt_tokens
    # The streams stood still in their held decode meanwhile: what came after we saw it held
    # can only be the step before's tokens, one per stream, still on their way.
    assert tokens_meanwhile <= 2
    assert [r.text for r in results] == alone
    assert all(r.tokens_generated == 8 for r in results)


def _nice_of(pid: int, tid: int) -> int:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of stat(5), counted after the ")" that ends the name


def test_the_worker_and_the_threads_it_decodes_with_run_at_the_nice_it_was_given(
    small_gguf: Path, runtime_dir: Path
) -> None:
    worker = worker_for(small_gguf, runtime_dir, "niced", n_ctx=N_CTX, n_threads=2, nice=3)
    worker.start(timeout=120)
    try:
        pid = worker.pid
        assert pid is not None
        before = set(os.listdir(f"/proc/{pid}/task"))  # ZeroMQ's, the watchdog: the node's nice
        run_request(worker, request(PROMPTS[0], 4))
        started = set(os.listdir(f"/proc/{pid}/task")) - before  # llama.cpp's decode threads
        assert _nice_of(pid, pid) == 3
        assert started, "the decode started no thread of its own"
        assert {_nice_of(pid, int(tid)) for tid in started} == {3}
    finally:
        worker.stop()


def _thp_mode() -> str:
    """The kernel's transparent huge page mode: "always", "madvise", "never" ("" if unknown)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def _glibc_at_least(major: int, minor: int) -> bool:
    name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (major, minor)


def _asked_for_huge_pages(pid: int) -> bool:
    """Whether any of the process's mappings was marked MADV_HUGEPAGE ("hg" in its VmFlags)."""
    flags = [
        ln for ln in Path(f"/proc/{pid}/smaps").read_text().splitlines() if ln[:8] == "VmFlags:"
    ]
    return any("hg" in ln.split()[1:] for ln in flags)


@pytest.mark.skipif(
    _thp_mode() != "madvise" or not _glibc_at_least(2, 35),
    reason="glibc asks for huge pages (glibc.malloc.hugetlb=1) only under THP madvise, from 2.35",
)
@pytest.mark.parametrize("huge_pages", [True, False])
def test_a_worker_asks_for_huge_pages_only_when_told_and_says_how_many_it_got(
    small_gguf: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch, huge_pages: bool
) -> None:
    # A tunable of the node's own: the worker's must join it and still take effect (glibc
    # rewrites the variable in place, so /proc/PID/environ cannot show the joined string).
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    worker = worker_for(small_gguf, runtime_dir, "thp", n_ctx=N_CTX, huge_pages=huge_pages)
    worker.start(timeout=120)
    try:
        assert worker.pid is not None
        # The request itself, not what the kernel could give: that depends on free 2 MiB blocks.
        assert _asked_for_huge_pages(worker.pid) is huge_pages
        assert worker.log_path is not None
        said = [ln for ln in worker.log_path.read_text().splitlines() if "huge pages" in ln]
        assert len(said) == 1 and "MiB of host memory in transparent huge pages" in said[0]
        assert run_request(worker, request(PROMPTS[0], 4)).tokens_generated == 4
    finally:
        worker.stop()
