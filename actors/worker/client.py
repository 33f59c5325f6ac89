"""The supervisor side of a model worker process, used by the ModelActor: a `WorkerHandle`.

`WorkerProcess` spawns `python -m actors.worker.main`, hands it the model to load over a ZMQ PAIR
socket on `ipc://{runtime_dir}/{name}-{uuid}.sock` (the control socket), and once it is loaded
opens request channels to it (actors/worker/channel.py, over the Unix socket the worker listens
on): the one path a request takes. Every wait of the load is a short poll that also checks the
process, so a worker that dies while loading is noticed within ~50 ms and reported with its
signal or exit code instead of a hang. A worker that crashed in native code is described by the
function that crashed and the CPU (actors/worker/native_crash.py reads them from the worker's
log), else by the end of its log.

Threading: `start` is called from one thread (the actor's). `stop`, `kill`, `alive` and `pid`
may be called from any thread; a `stop` during `start` signals the process rather than touching
the socket (ZMQ sockets are not thread-safe), and `start` then fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import zmq

import actors
from actors.errors import ModelLoadFailed, WorkerCrashed
from actors.worker.channel import WorkerChannel
from actors.worker.handle import WorkerSpec
from actors.worker.native_crash import describe_crash
from actors.worker.protocol import (
    PROTOCOL_VERSION,
    Hello,
    Loaded,
    LoadFailed,
    Message,
    ProtocolError,
    SetThreads,
    Shutdown,
    decode,
    encode,
)

_POLL_S = 0.05  # how long one wait of the load lasts before the process is checked again
_MAX_IPC_PATH = 100  # sun_path holds 108 bytes; leave room for the terminating NUL
_HUGETLB = "glibc.malloc.hugetlb"  # glibc >= 2.35; an older glibc ignores it


def with_huge_pages(tunables: str) -> str:
    """Return glibc tunables (`GLIBC_TUNABLES`, colon-separated) with malloc asking for
    transparent huge pages (`glibc.malloc.hugetlb=1`), unless they already say otherwise."""
    kept = [t for t in tunables.split(":") if t]
    if any(t.split("=", 1)[0] == _HUGETLB for t in kept):
        return tunables
    return ":".join([*kept, f"{_HUGETLB}=1"])


def describe_exit(returncode: int) -> str:
    """Say how a process ended: "signal 9 (SIGKILL)" or "exit code 3"."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
        return f"signal {-returncode} ({name})"
    return f"exit code {returncode}"


def _socket_dir(runtime_dir: Path, filename: str) -> Path:
    """Return runtime_dir, or a private temp dir when the path would not fit in sun_path."""
    if len(str(runtime_dir / filename)) + len("ipc://") <= _MAX_IPC_PATH:
        return runtime_dir
    return Path(tempfile.mkdtemp(prefix="moc-"))


class WorkerProcess:
    """One model worker process and its control socket; requests go through `open_channel`."""

    def __init__(self, spec: WorkerSpec, *, runtime_dir: Path) -> None:
        self.spec = spec
        self.runtime_dir = Path(runtime_dir)
        self.version = ""
        self.peak_memory_mb: float | None = None  # measured after the load and each request
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: zmq.Socket[bytes] | None = None
        self._sock_path: Path | None = None
        self._data_path: Path | None = None
        self._log_path: Path | None = None
        self._log_mark = 0  # the log's size when the load finished: later errors show only past it
        self._loading = False  # start() owns the socket
        self._stopped = False

    # -- state visible from any thread ------------------------------------------------------

    @property
    def name(self) -> str:
        """The model's name, for messages and file names."""
        return self.spec.name

    @property
    def pid(self) -> int | None:
        """Return the worker's process id once started."""
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def data_socket(self) -> str:
        """The Unix socket path the worker listens on for requests from the node's event loop."""
        if self._data_path is None:
            raise WorkerCrashed(f"worker for {self.spec.name} was never started")
        return str(self._data_path)

    def exit_code(self) -> int | None:
        """Return the worker's exit status once it has exited (negative: the signal), else None."""
        proc = self._proc
        return None if proc is None else proc.poll()

    def describe_end(self) -> str:
        """Say how the worker ended, with what its log says of it, for error messages."""
        code = self.exit_code()
        how = "was stopped" if self._stopped else f"died ({describe_exit(code or 0)})"
        return how + self._log_detail()

    @property
    def log_path(self) -> Path | None:
        """The file that holds the worker's stdout and stderr (kept unless it exits cleanly)."""
        return self._log_path

    @property
    def alive(self) -> bool:
        """Say whether the worker process is running."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    # -- start ----------------------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> Loaded:
        """Spawn the worker and load the model; raise ModelLoadFailed with the worker's reason."""
        if self._proc is not None:
            raise RuntimeError(f"worker for {self.spec.name} was already started")
        deadline = time.monotonic() + timeout
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.spec.name)[:32]}-{uuid.uuid4().hex[:12]}"
        sock_dir = _socket_dir(self.runtime_dir, f"{tag}-data.sock")
        self._sock_path = sock_dir / f"{tag}.sock"
        self._data_path = sock_dir / f"{tag}-data.sock"
        self._log_path = self.runtime_dir / f"{tag}.log"
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"ipc://{self._sock_path}")
        self._sock = sock
        with self._lock:
            self._loading = True  # the handshake owns the socket
        try:
            self._spawn()
            info = self._handshake(deadline, timeout)
        except BaseException:
            with self._lock:
                self._loading = False
            self.stop(timeout=2.0)
            raise
        with self._lock:
            self._loading = False
            stopped = self._stopped
        if stopped:  # stop() came from another thread while the model loaded
            self.stop()
            raise ModelLoadFailed(f"worker for {self.spec.name} was stopped while loading")
        return info

    def _spawn(self) -> None:
        assert self._log_path is not None and self._sock_path is not None
        assert self._data_path is not None
        env = dict(os.environ)
        # The worker must import this very tree, installed or not.
        root = str(Path(actors.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        if self.spec.huge_pages:
            env["GLIBC_TUNABLES"] = with_huge_pages(env.get("GLIBC_TUNABLES", ""))
        cmd = [
            sys.executable,
            "-m",
            "actors.worker.main",
            "--endpoint",
            f"ipc://{self._sock_path}",
            "--data-socket",
            str(self._data_path),
            "--parent-pid",
            str(os.getpid()),
        ]
        with open(self._log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, close_fds=True
            )
        with self._lock:
            self._proc = proc

    def _handshake(self, deadline: float, timeout: float) -> Loaded:
        hello = self._wait_load_step(deadline, timeout, "starting")
        if not isinstance(hello, Hello):
            raise ModelLoadFailed(f"worker for {self.spec.name} sent {type(hello).__name__} first")
        if hello.version != PROTOCOL_VERSION:
            raise ModelLoadFailed(
                f"worker for {self.spec.name} speaks protocol {hello.version}, "
                f"expected {PROTOCOL_VERSION}"
            )
        name = self.spec.name
        if not self._send(self.spec.load):
            raise ModelLoadFailed(f"worker for {name} went away before it could load")
        reply = self._wait_load_step(deadline, timeout, "loading")
        if isinstance(reply, LoadFailed):
            raise ModelLoadFailed(f"cannot load {name}: {reply.error}")
        if not isinstance(reply, Loaded):
            raise ModelLoadFailed(f"worker for {name} answered the load with {type(reply).__name__}")
        self.version = reply.version
        self.note_memory(reply.measured_mb)
        with contextlib.suppress(OSError):
            self._log_mark = self._log_path.stat().st_size if self._log_path else 0
        return reply

    def _wait_load_step(self, deadline: float, timeout: float, doing: str) -> Message:
        while True:
            msg = self._recv(_POLL_S)
            if msg is not None:
                return msg
            code = self.exit_code()
            if code is not None:
                raise ModelLoadFailed(
                    f"worker for {self.spec.name} exited ({describe_exit(code)}) while {doing}"
                    + self._log_detail()
                )
            if time.monotonic() >= deadline:
                raise ModelLoadFailed(
                    f"worker for {self.spec.name} did not load within {timeout:g} s"
                )

    # -- requests -------------------------------------------------------------------------

    def open_channel(self) -> WorkerChannel:
        """Open a request channel to the started worker (on the running event loop)."""
        return WorkerChannel(self)

    def note_memory(self, mb: float) -> None:
        """Record the memory a reply reported, keeping the peak."""
        self.peak_memory_mb = mb if self.peak_memory_mb is None else max(self.peak_memory_mb, mb)

    # -- stop -----------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, kill it after `timeout`, and reap it. Safe to call twice."""
        with self._lock:
            proc = self._proc
            first = not self._stopped
            self._stopped = True
            if first and proc is not None and proc.poll() is None:
                if self._loading:
                    proc.send_signal(signal.SIGTERM)  # the socket belongs to start() right now
                else:
                    if not self._send(Shutdown()):
                        proc.send_signal(signal.SIGTERM)
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with self._lock:
            if not self._loading:
                self._close_socket()
        if proc is not None and proc.returncode == 0 and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)  # keep the logs of workers that failed

    def set_threads(self, n_threads: int) -> bool:
        """Tell the loaded model to compute with `n_threads`; False when no worker takes it."""
        with self._lock:
            if self._loading or self._stopped:
                return False
            return self._send(SetThreads(n_threads))

    def kill(self) -> None:
        """Kill the worker at once and reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._data_path is not None:
            self._data_path.unlink(missing_ok=True)  # the worker's, left behind by a kill -9
        if self._sock_path is not None:
            self._sock_path.unlink(missing_ok=True)
            if self._sock_path.parent != self.runtime_dir:
                with contextlib.suppress(OSError):  # the private fallback dir for a long path
                    self._sock_path.parent.rmdir()
            self._sock_path = None

    # -- socket helpers -------------------------------------------------------------------

    def _send(self, msg: Message) -> bool:
        """Send without blocking; False when the worker is not there to take it.

        A PAIR socket whose peer has gone blocks a send forever: never wait on one.
        """
        if self._sock is None:
            return False
        try:
            self._sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _recv(self, timeout_s: float) -> Message | None:
        sock = self._sock
        if sock is None or not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        try:
            return decode(sock.recv())
        except ProtocolError as exc:
            raise WorkerCrashed(f"worker for {self.spec.name} sent garbage: {exc}") from exc

    def _log_detail(self, limit: int = 400) -> str:
        """Return what the worker's log says of its end, for error messages.

        A native crash: the function that crashed and the CPU, and where the whole log is (its
        tail would be interpreter frames). Otherwise: the log's last `limit` bytes. Once the
        model has loaded, only what the worker wrote since counts: the load's own report (where
        the weights went) says nothing of a later death.
        """
        if self._log_path is None:
            return ""
        try:
            with self._log_path.open("rb") as fh:
                fh.seek(self._log_mark)
                log = fh.read()
        except OSError:
            return ""
        crash = describe_crash(log.decode("utf-8", errors="replace"))
        if crash is not None:
            return f": {crash}; log: {self._log_path}"
        text = log[-limit:].decode("utf-8", errors="replace").strip()
        return f": {text}" if text else ""

