"""Real worker processes running real llama.cpp on generated models, driven through the one
request path production takes (tests/actors/worker/workers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from actors.errors import InvalidRequest, ModelLoadFailed, RequestTimeout, WorkerCrashed
from actors.types import ChatMessage, GenerationParams, InferRequest, TensorData
from actors.worker.backends.gguf import open_llama
from actors.worker.client import WorkerProcess, with_huge_pages
from actors.worker.protocol import Loaded
from tests.actors.worker.workers import PROMPT, greedy, run_request, worker_for
from tests.support import wait_until

N_CTX = 1024


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (gone, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def shared_runtime() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="moc-rt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_worker(tiny_gguf: Path, shared_runtime: Path) -> Iterator[tuple[WorkerProcess, Loaded]]:
    """One worker on the tiny model, shared by the tests that leave it running."""
    w = worker_for(tiny_gguf, shared_runtime, "tiny", n_ctx=N_CTX, n_threads=1)
    info = w.start(timeout=60)
    yield w, info
    w.stop()


@pytest.fixture(scope="module")
def direct_llama(tiny_gguf: Path) -> Any:
    """llama.cpp in this process, loaded the same way, for byte-for-byte comparisons."""
    kwargs = {
        "model_path": str(tiny_gguf),
        "n_ctx": N_CTX,
        "seed": 0,
        "n_threads": 1,
        "n_threads_batch": 1,
        "use_mmap": False,
        "verbose": False,
    }
    llm = open_llama(llama_cpp, kwargs, cpu_repack=False)
    yield llm
    llm.close()


def start_worker(path: Path, runtime_dir: Path, name: str = "w") -> WorkerProcess:
    w = worker_for(path, runtime_dir, name, n_ctx=N_CTX, n_threads=1)
    w.start(timeout=60)
    return w


def test_the_worker_reports_what_it_loaded(tiny_worker: tuple[WorkerProcess, Loaded]) -> None:
    w, info = tiny_worker
    assert info.pid == w.pid and w.alive
    assert info.n_ctx == N_CTX
    assert info.version.startswith("moc-synthetic-tiny@")
    assert info.measured_mb > 0
    assert info.load_seconds > 0


def test_greedy_text_equals_llama_cpp_byte_for_byte(
    tiny_worker: tuple[WorkerProcess, Loaded], direct_llama: Any
) -> None:
    w, _ = tiny_worker
    expected = direct_llama.create_completion(PROMPT, max_tokens=48, temperature=0.0)
    result = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(48)))
    assert result.text == expected["choices"][0]["text"]
    assert result.tokens_generated == 48 == len(result.text)  # one printable byte per token
    assert result.text.isprintable() and result.text.isascii()
    assert result.finish_reason == "length"
    assert result.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_streamed_pieces_concatenate_to_the_whole_text(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    whole = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(40)))
    pieces: list[str] = []
    streamed = run_request(
        w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(40)), on_token=pieces.append
    )
    assert len(pieces) == 40
    assert "".join(pieces) == streamed.text == whole.text


def test_a_stop_sequence_split_across_tokens_is_never_emitted(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    full = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(60))).text
    stop = full[20:23]  # three tokens: one byte each
    pieces: list[str] = []
    result = run_request(
        w,
        InferRequest(model="tiny", prompt=PROMPT, params=greedy(60, stop=(stop,))),
        on_token=pieces.append,
    )
    assert result.text == full[: full.index(stop)]
    assert result.finish_reason == "stop"
    assert "".join(pieces) == result.text
    assert stop not in "".join(pieces)


def test_the_same_prompt_again_reports_every_prompt_token_reused_and_its_first_token_time(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    req = InferRequest(model="tiny", prompt="An agent repeats this prompt.", params=greedy(1))
    first, again = run_request(w, req), run_request(w, req)
    assert first.prompt_tokens_reused < first.prompt_tokens  # decoded (all but a BOS, maybe)
    assert again.prompt_tokens_reused == again.prompt_tokens == first.prompt_tokens
    assert again.text == first.text
    for result in (first, again):
        assert result.first_token_ms is not None
        assert 0.0 <= result.first_token_ms <= result.latency_ms


def test_max_tokens_bounds_the_output(tiny_worker: tuple[WorkerProcess, Loaded]) -> None:
    w, _ = tiny_worker
    result = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(5)))
    assert result.tokens_generated == 5
    assert len(result.text) == 5
    assert result.finish_reason == "length"


def test_the_same_seed_samples_the_same_text(tiny_worker: tuple[WorkerProcess, Loaded]) -> None:
    w, _ = tiny_worker
    params = GenerationParams(max_tokens=32, temperature=1.0, top_p=0.95, seed=1234)
    a = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=params))
    b = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=params))
    assert a.text == b.text and len(a.text) == 32


def test_chat_uses_the_model_template_like_llama_cpp(
    tiny_worker: tuple[WorkerProcess, Loaded], direct_llama: Any
) -> None:
    w, _ = tiny_worker
    messages = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there"))
    expected = direct_llama.create_chat_completion(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        max_tokens=24,
        temperature=0.0,
    )
    result = run_request(w, InferRequest(model="tiny", messages=messages, params=greedy(24)))
    assert result.text == expected["choices"][0]["message"]["content"]
    assert result.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert result.tokens_generated == 24


def test_a_prompt_longer_than_the_context_is_an_invalid_request(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    with pytest.raises(InvalidRequest, match="context holds") as err:
        run_request(w, InferRequest(model="tiny", prompt="x" * (N_CTX + 10), params=greedy(4)))
    assert err.value.field == "prompt"
    assert w.alive  # the worker survives a bad request


def test_tensors_sent_to_a_gguf_model_are_an_invalid_request(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    tensor = TensorData("float32", (1,), b"\x00\x00\x80\x3f")
    with pytest.raises(InvalidRequest) as err:
        run_request(w, InferRequest(model="tiny", tensors=(tensor,)))
    assert err.value.field == "tensors"


def test_a_passed_deadline_raises_request_timeout(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    with pytest.raises(RequestTimeout):
        run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(900)), timeout_s=0.0)
    assert (
        run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(2))).tokens_generated
        == 2
    )


def test_kill_9_mid_request_raises_worker_crashed_promptly_and_leaves_no_zombie(
    small_gguf: Path, runtime_dir: Path
) -> None:
    w = start_worker(small_gguf, runtime_dir, name="victim")
    pid = w.pid
    assert pid is not None
    killed_at: list[float] = []

    def kill_on_first_token(_text: str) -> None:
        if not killed_at:
            os.kill(pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    with pytest.raises(
        WorkerCrashed, match=r"worker for victim died \(signal 9 \(SIGKILL\)\) during the request"
    ):
        run_request(
            w,
            InferRequest(model="victim", prompt=PROMPT, params=greedy(1000)),
            on_token=kill_on_first_token,
        )
    noticed = time.monotonic() - killed_at[0]
    assert noticed < 2.0  # polls every 50 ms; generous for a loaded CI machine
    assert not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie
    assert not w.alive
    w.stop()
    w.stop()  # idempotent


def test_stop_leaves_no_process_and_no_socket(tiny_gguf: Path, runtime_dir: Path) -> None:
    w = start_worker(tiny_gguf, runtime_dir)
    pid = w.pid
    assert pid is not None and w.alive
    w.stop()
    assert not w.alive
    assert not os.path.exists(f"/proc/{pid}")
    assert list(runtime_dir.glob("*.sock")) == []
    with pytest.raises(WorkerCrashed, match="cannot reach the worker for w"):
        run_request(w, InferRequest(model="w", prompt="x", params=greedy(1)))


def test_a_stop_from_another_thread_cancels_the_running_request_and_the_worker_exits(
    small_gguf: Path, runtime_dir: Path
) -> None:
    w = start_worker(small_gguf, runtime_dir, name="busy")
    pieces: list[str] = []
    stopping: list[threading.Thread] = []

    def on_token(text: str) -> None:
        pieces.append(text)
        if not stopping:
            stopping.append(threading.Thread(target=w.stop))
            stopping[0].start()

    result = run_request(
        w, InferRequest(model="busy", prompt=PROMPT, params=greedy(1000)), on_token=on_token
    )
    assert result.finish_reason == "cancelled"
    assert 1 <= result.tokens_generated < 1000
    assert "".join(pieces) == result.text
    stopping[0].join(timeout=30)
    assert w.exit_code() == 0  # it answered, then left on the Shutdown
    assert list(runtime_dir.glob("*.sock")) == []


def test_the_worker_exits_by_itself_when_its_supervisor_dies(
    tiny_gguf: Path, runtime_dir: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import sys, threading
        from pathlib import Path
        from tests.actors.worker.workers import worker_for
        w = worker_for(Path({str(tiny_gguf)!r}), Path({str(runtime_dir)!r}), "orphan", n_ctx=256)
        info = w.start(timeout=60)
        print(info.pid, flush=True)
        threading.Event().wait()
        """
    )
    root = str(Path(__file__).resolve().parents[3])
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        assert supervisor.stdout is not None
        worker_pid = int(supervisor.stdout.readline())
        assert not process_gone(worker_pid)
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        wait_until(lambda: process_gone(worker_pid), 5.0, "the orphaned worker to exit")
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_a_file_that_is_not_gguf_fails_to_load_with_a_clear_message(
    tmp_path: Path, runtime_dir: Path
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not a model" * 10)
    w = worker_for(bad, runtime_dir, "bad")
    with pytest.raises(ModelLoadFailed, match=r"cannot load bad: .*bad.gguf is not a GGUF file"):
        w.start(timeout=60)
    assert not w.alive


def test_a_truncated_gguf_fails_to_load_with_llama_cpps_reason(
    tiny_gguf: Path, tmp_path: Path, runtime_dir: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:20000])
    w = worker_for(cut, runtime_dir, "cut")
    with pytest.raises(ModelLoadFailed, match=r"cannot load cut: llama.cpp could not load") as err:
        w.start(timeout=60)
    assert str(cut) in str(err.value)
    assert not w.alive
    pid = w.pid
    assert pid is not None and not os.path.exists(f"/proc/{pid}")


def test_a_missing_file_fails_to_load(tmp_path: Path, runtime_dir: Path) -> None:
    w = worker_for(tmp_path / "nope.gguf", runtime_dir, "gone")
    with pytest.raises(ModelLoadFailed, match="does not exist"):
        w.start(timeout=60)


def test_a_long_runtime_dir_still_gets_a_working_socket(tiny_gguf: Path, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    w = start_worker(tiny_gguf, deep, name="deep")
    try:
        assert (
            run_request(
                w, InferRequest(model="deep", prompt="a", params=greedy(2))
            ).tokens_generated
            == 2
        )
    finally:
        w.stop()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            InferRequest(model="tiny", prompt="a", params=GenerationParams(max_tokens=0)),
            "max_tokens",
        ),
        (
            InferRequest(model="tiny", prompt="a", params=GenerationParams(temperature=-1.0)),
            "temperature",
        ),
        (InferRequest(model="tiny", prompt="a", params=GenerationParams(top_p=1.5)), "top_p"),
        (InferRequest(model="tiny"), "prompt"),
        (InferRequest(model="tiny", prompt="a", messages=(ChatMessage("user", "b"),)), "prompt"),
    ],
    ids=["max-tokens-zero", "negative-temperature", "top-p-above-one", "no-input", "two-inputs"],
)
def test_malformed_parameters_are_refused_naming_the_field(
    tiny_worker: tuple[WorkerProcess, Loaded], request_: InferRequest, field: str
) -> None:
    w, _ = tiny_worker
    with pytest.raises(InvalidRequest) as err:
        run_request(w, request_)
    assert err.value.field == field


def test_a_failing_token_callback_stops_the_request_and_is_raised(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker

    def broken(_text: str) -> None:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        run_request(
            w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(900)), on_token=broken
        )
    # Leaving the stream cancelled it in the worker: the next request is served, in full.
    assert (
        run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(4))).tokens_generated
        == 4
    )


def test_a_terminal_ctrl_c_does_not_kill_the_worker(
    tiny_worker: tuple[WorkerProcess, Loaded],
) -> None:
    w, _ = tiny_worker
    assert w.pid is not None
    os.kill(w.pid, signal.SIGINT)  # what the terminal sends to the whole process group
    assert (
        run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(3))).tokens_generated
        == 3
    )
    assert w.alive


def test_a_worker_told_a_new_thread_count_computes_with_it_and_keeps_serving(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    w = start_worker(tiny_gguf, tmp_path)
    try:
        before = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(8)))
        assert w.set_threads(2)
        log = w.log_path
        assert log is not None
        wait_until(lambda: "computing with 2 thread(s)" in log.read_text(), 10, "the worker's note")
        after = run_request(w, InferRequest(model="tiny", prompt=PROMPT, params=greedy(8)))
        assert after.tokens_generated == before.tokens_generated == 8
    finally:
        w.stop()
    assert not w.set_threads(1)  # a stopped worker takes nothing


@pytest.mark.parametrize(
    ("tunables", "wanted"),
    [
        ("", "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the operator said no
        ("a=1:glibc.malloc.hugetlb=2", "a=1:glibc.malloc.hugetlb=2"),
    ],
)
def test_huge_pages_join_the_glibc_tunables_unless_they_already_set_them(
    tunables: str, wanted: str
) -> None:
    assert with_huge_pages(tunables) == wanted
