"""The GGUF backend's llama.cpp log hook outlives every load.

llama.cpp keeps the hook's address and calls it whenever it logs. A hook freed after its load
left a dangling pointer: the next log line (freeing the model, or any line a CUDA build writes)
crashed the worker with SIGSEGV, which is how the first run on a real GPU failed every GGUF
load. Each case runs in a child process, so a crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

LOAD_COLLECT_CLOSE = textwrap.dedent(
    """
    import gc, sys
    from actors.worker.backends.loader import load_model
    from actors.worker.protocol import LoadSpec

    first = load_model(LoadSpec(backend="gguf", path=sys.argv[1], n_ctx=64))
    gc.collect()  # the hook's cycle (hook -> callback -> closure -> hook) goes here if unowned
    churn = [bytearray(100) for _ in range(100_000)]  # reuse whatever memory was freed
    first.close()  # llama.cpp logs while freeing the context
    second = load_model(LoadSpec(backend="gguf", path=sys.argv[1], n_ctx=64))
    second.close()
    print("closed both")
    """
)

BAD_FILE_THEN_LOAD = textwrap.dedent(
    """
    import sys
    from actors.worker.backends import BackendError
    from actors.worker.backends.loader import load_model
    from actors.worker.protocol import LoadSpec

    try:
        load_model(LoadSpec(backend="gguf", path=sys.argv[2], n_ctx=64))
    except BackendError as exc:
        print("refused:", exc)
    model = load_model(LoadSpec(backend="gguf", path=sys.argv[1], n_ctx=64))
    model.close()
    print("loaded after a failure")
    """
)


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_a_model_closed_after_its_load_hook_is_collected_does_not_crash(tiny_gguf: Path) -> None:
    done = _run(LOAD_COLLECT_CLOSE, str(tiny_gguf))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "closed both" in done.stdout


def test_a_failed_load_still_reports_llama_cpp_lines_and_the_next_load_works(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    # GGUF magic, then garbage: llama.cpp itself rejects it and logs why.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    done = _run(BAD_FILE_THEN_LOAD, str(tiny_gguf), str(broken))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: llama.cpp could not load" in done.stdout
    assert "loaded after a failure" in done.stdout
