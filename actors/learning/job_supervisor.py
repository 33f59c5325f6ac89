"""The node's side of a learning job's process: spawn it, relay its events, say how it ended.

`JobProcess` starts `python -m actors.learning.job_process` with an events pipe and a
supervisor thread. The thread reads the pipe (progress events go to `on_event`), enforces the
kill deadline a `terminate` set, reaps the process and hands `on_exit` a `JobExit`. Training
runs in the child so torch never holds the node's GIL (the node's gossip and RPC stay on
time), and a crash inside torch fails one job, not the node.

Why a `-m` command and not `multiprocessing`: the child needs nothing of the parent's state
(its job is in the store), a plain command is what the model workers use too (same PYTHONPATH,
parent-pid watchdog, stderr to a log file), and it works the same whatever the node's
multiprocessing start method is; "spawn" would cost the same interpreter start anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import actors
from actors.learning.config import LearningConfig
from actors.learning.job_process import EXIT_ORPHANED, encode_job
from actors.worker_client import describe_exit

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how long one wait on the pipe lasts before the kill deadline is checked again
_LOG_TAIL = 400  # characters of the child's stderr quoted in a crash's error

Ending = Literal["completed", "stopped", "failed"]


@dataclass(frozen=True, slots=True)
class JobExit:
    """How a job's process ended: its result, or why it failed; `killed` if we killed it."""

    ending: Ending
    output_path: Path | None = None
    lora_base: str | None = None
    error: str | None = None
    killed: bool = False
    returncode: int | None = None


def judge_exit(
    last: dict[str, Any] | None, returncode: int, *, killed: bool, log_tail: str = ""
) -> JobExit:
    """Decide how a job ended from its last report (`result`/`error` event) and its exit."""
    if last is not None and last.get("event") == "result" and returncode == 0:
        out = last.get("output_path")
        if last.get("ending") == "completed" and out:
            return JobExit("completed", Path(out), last.get("lora_base"), returncode=0)
        return JobExit("stopped", returncode=0)
    if last is not None and last.get("event") == "error":
        return JobExit("failed", error=str(last.get("error")), returncode=returncode)
    how = describe_exit(returncode)
    if killed:
        return JobExit("stopped", error=f"killed ({how})", killed=True, returncode=returncode)
    if returncode == EXIT_ORPHANED:
        reason = "exited because its parent process was gone"
    else:
        reason = f"died ({how}) before reporting a result"
    tail = f"; its log ends: {log_tail}" if log_tail else ""
    return JobExit("failed", error=f"the training process {reason}{tail}", returncode=returncode)


class JobProcess:
    """One job's child process and the thread that supervises it."""

    def __init__(
        self,
        job_id: str,
        config: LearningConfig,
        models: dict[str, Path],
        *,
        on_event: Callable[[dict[str, Any]], None],
        on_exit: Callable[[JobExit], None],
    ) -> None:
        self.job_id = job_id
        self.config = config
        self.models = models
        self.outcome: JobExit | None = None  # set before on_exit is called
        self._on_event = on_event
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._kill_at: float | None = None  # monotonic deadline set by terminate()
        self._killed = False
        self.log_path = Path(config.output_dir) / "logs" / f"{job_id}.log"

    @property
    def pid(self) -> int | None:
        """Return the child's process id once started."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Spawn the child and its supervisor thread (returns at once: no wait for torch)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        # The child must import this very tree, installed or not.
        root = str(Path(actors.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable,
            "-P",  # no cwd on sys.path: an `actors` package there must not shadow this tree
            "-m",
            "actors.learning.job_process",
            "--events-fd",
            str(write_fd),
            "--parent-pid",
            str(os.getpid()),
            encode_job(self.job_id, self.config, self.models),
        ]
        try:
            with open(self.log_path, "ab") as log_file:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    env=env,
                    close_fds=True,
                    pass_fds=(write_fd,),
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # only the child writes: its exit is the pipe's end
        self._thread = threading.Thread(
            target=self._supervise, args=(read_fd,), name=f"learning-{self.job_id}", daemon=True
        )
        self._thread.start()

    def terminate(self, grace_s: float) -> None:
        """Ask the child to stop before its next step; kill it if it is still there after grace_s."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                return
            deadline = time.monotonic() + grace_s
            self._kill_at = deadline if self._kill_at is None else min(self._kill_at, deadline)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def join(self, timeout: float) -> bool:
        """Wait for the child's end to be handled; return whether it was."""
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            return not self._thread.is_alive()
        return True

    # -- the supervisor thread ------------------------------------------------------------------

    def _supervise(self, read_fd: int) -> None:
        last: dict[str, Any] | None = None
        buffer = b""
        try:
            while True:
                ready, _, _ = select.select([read_fd], [], [], _POLL_S)
                if ready:
                    chunk = os.read(read_fd, 65536)
                    if not chunk:
                        break  # the child exited (or closed the pipe on its way out)
                    *lines, buffer = (buffer + chunk).split(b"\n")
                    for line in lines:
                        event = self._parse(line)
                        if event is None:
                            continue
                        if event.get("event") in ("result", "error"):
                            last = event
                        else:
                            self._relay(event)
                self._kill_if_overdue()
        finally:
            os.close(read_fd)
        assert self._proc is not None
        while True:
            try:
                code = self._proc.wait(_POLL_S)
                break
            except subprocess.TimeoutExpired:
                self._kill_if_overdue()
        outcome = judge_exit(last, code, killed=self._killed, log_tail=self._log_tail(code))
        if code == 0:
            self.log_path.unlink(missing_ok=True)  # keep only the logs of failed runs
        self.outcome = outcome
        self._on_exit(outcome)

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("learning job %s: unreadable event %r", self.job_id, line[:200])
            return None
        return event if isinstance(event, dict) else None

    def _relay(self, event: dict[str, Any]) -> None:
        try:
            self._on_event(event)
        except Exception:  # a progress listener's bug must not lose the job's end
            log.exception("learning job %s: the progress listener failed", self.job_id)

    def _kill_if_overdue(self) -> None:
        with self._lock:
            proc = self._proc
            if self._kill_at is None or proc is None or time.monotonic() < self._kill_at:
                return
            if proc.poll() is None:
                log.warning("learning job %s ignored SIGTERM: killing it", self.job_id)
                self._killed = True
                proc.kill()
            self._kill_at = None

    def _log_tail(self, code: int) -> str:
        if code == 0:
            return ""
        try:
            raw = self.log_path.read_bytes()[-_LOG_TAIL:]
        except OSError:
            return ""
        return " ".join(raw.decode("utf-8", errors="replace").split())
