"""A worker that crashes in native code leaves its Python stack in its log.

llama-cpp-python points fd 2 at /dev/null while it loads a model, which is where a load crashes
if it does, so the worker's fault handler writes through its own copy of stderr.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

CRASH_WITH_STDERR_SILENCED = textwrap.dedent(
    """
    import ctypes, faulthandler, os
    from actors.worker.main import _crash_log

    faulthandler.enable(file=_crash_log())
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # what suppress_stdout_stderr does
    ctypes.string_at(0)  # a native crash
    """
)


def test_a_native_crash_while_stderr_is_silenced_still_reaches_the_log(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-c", CRASH_WITH_STDERR_SILENCED],
            stderr=out,
            cwd=ROOT,
            timeout=60,
        )
    assert done.returncode == -11
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text
    assert "string_at" in text
