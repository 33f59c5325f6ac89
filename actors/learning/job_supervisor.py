"""The node's side of a learning job's process: start it, relay its events, say how it ended.

`JobProcess` starts a job's process from the learning fork server and runs a supervisor
thread. The thread starts the process, reads its events pipe (progress events go to
`on_event`), enforces the kill deadline a `terminate` set, waits for the exit and hands
`on_exit` a `JobExit`. Training runs in a child so torch never holds the node's GIL (the node's
gossip and RPC stay on time), and a crash inside torch fails one job, not the node.

The fork server (multiprocessing's "forkserver" start method) is a template process that
imports torch and the training modules once; each job is a fork of it, so a job's first step
comes a fraction of a second after its start instead of after an interpreter start and the
torch import (3-6 s). The node itself never imports torch: the server is a fresh interpreter
that multiprocessing execs. `warm_up` starts it in the background (the actor calls it at the
first submit), so a node that never trains never imports torch at all. Forking a process that
ran no torch op is safe: torch's thread pools start at the first op, in the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Literal

from actors.learning.config import LearningConfig
from actors.learning.job_process import EXIT_ORPHANED, encode_job, ready, run_forked
from actors.worker.client import describe_exit

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how long one wait on the pipe lasts before the kill deadline is checked again
_LOG_TAIL = 400  # characters of the child's stderr quoted in a crash's error
# What the fork server imports once for every job (absent ones are skipped: a job without torch
# then fails with the import error in its own log). torch._dynamo is what the first optimizer
# imports lazily (about 2 s, 800 modules): without it here every job would pay it at step 1.
PRELOAD = (
    "torch",
    "torch._dynamo",
    "gguf",
    "llama_cpp",
    "actors.learning.training",
    "actors.learning.job_process",
)

JobEnding = Literal["completed", "stopped", "failed"]

_server_lock = threading.Lock()
_warming: threading.Thread | None = None


def _context() -> Any:
    """Return the forkserver context, its preload set (once, before the server starts)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def warm_up() -> threading.Thread:
    """Start the fork server in the background (once per process) and return that thread.

    The thread forks one no-op job, which waits for the server's imports to finish, so the
    first real job starts at once.
    """
    global _warming
    with _server_lock:
        if _warming is None:
            _warming = threading.Thread(target=_warm, name="learning-forkserver", daemon=True)
            _warming.start()
        return _warming


def _warm() -> None:
    try:
        proc = _context().Process(target=ready, name="learning-warm-up", daemon=True)
        proc.start()
        proc.join()
    except Exception:  # the first job starts the server itself, and reports what fails
        log.exception("starting the learning fork server failed")


@dataclass(frozen=True, slots=True)
class JobExit:
    """How a job's process ended: its result, or why it failed; `killed` if we killed it."""

    ending: JobEnding
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
    """One job's process, forked from the learning fork server, and its supervisor thread."""

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
        self._proc: BaseProcess | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._kill_at: float | None = None  # monotonic deadline set by terminate()
        self._stop_asked = False  # terminate() came before the process existed
        self._exited = False  # the process ended (its object is closed)
        self._killed = False
        self.log_path = Path(config.output_dir) / "logs" / f"{job_id}.log"

    @property
    def pid(self) -> int | None:
        """Return the child's process id once started."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the supervisor thread, which starts the process (returns at once).

        The first fork can wait for the fork server's imports: that wait is the thread's, never
        the caller's. A failed start ends the job through `on_exit` ("failed").
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(
            target=self._supervise, name=f"learning-{self.job_id}", daemon=True
        )
        self._thread.start()

    def terminate(self, grace_s: float) -> None:
        """Ask the child to stop before its next step; kill it if it is still there after grace_s."""
        with self._lock:
            deadline = time.monotonic() + grace_s
            self._kill_at = deadline if self._kill_at is None else min(self._kill_at, deadline)
            proc = self._proc
            if proc is None:
                self._stop_asked = True  # sent as soon as the process exists
                return
            if not self._exited:  # only the supervisor polls: two pollers race for the status
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()

    def join(self, timeout: float) -> bool:
        """Wait for the child's end to be handled; return whether it was."""
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            return not self._thread.is_alive()
        return True

    # -- the supervisor thread ------------------------------------------------------------------

    def _spawn(self) -> tuple[BaseProcess, Connection]:
        ctx = _context()
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=run_forked,
            args=(encode_job(self.job_id, self.config, self.models), writer, str(self.log_path)),
            name=f"learning-{self.job_id}",
            daemon=True,  # the node's exit never waits for a job: it stops them itself
        )
        try:
            proc.start()
        except BaseException:
            reader.close()
            raise
        finally:
            writer.close()  # only the child writes: its exit is the pipe's end
        with self._lock:
            self._proc = proc
            if self._stop_asked:
                proc.terminate()
        return proc, reader

    def _supervise(self) -> None:
        try:
            proc, reader = self._spawn()
        except Exception as exc:
            log.exception("learning job %s: cannot start its process", self.job_id)
            self._finish(JobExit("failed", error=f"cannot start the training process: {exc}"))
            return
        last: dict[str, Any] | None = None
        try:
            while True:
                if reader.poll(_POLL_S):
                    try:
                        raw = reader.recv_bytes()
                    except EOFError:
                        break  # the child exited (or closed the pipe on its way out)
                    event = self._parse(raw)  # None: unreadable, and logged
                    if event is not None and event.get("event") in ("result", "error"):
                        last = event
                    elif event is not None:
                        self._relay(event)
                self._kill_if_overdue()
        finally:
            reader.close()
        while True:
            proc.join(_POLL_S)
            if proc.exitcode is not None:
                break
            self._kill_if_overdue()
        code = proc.exitcode
        with self._lock:
            self._exited = True
            proc.close()
        outcome = judge_exit(last, code, killed=self._killed, log_tail=self._log_tail(code))
        if code == 0:
            self.log_path.unlink(missing_ok=True)  # keep only the logs of failed runs
        self._finish(outcome)

    def _finish(self, outcome: JobExit) -> None:
        self.outcome = outcome
        self._on_exit(outcome)

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        try:
            event = json.loads(raw)
        except ValueError:
            log.warning("learning job %s: unreadable event %r", self.job_id, raw[:200])
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
            if proc.exitcode is None:
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
