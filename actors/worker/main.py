"""The model worker process: one model, driven by its supervisor.

    python -m actors.worker.main --endpoint ipc:///run/moc/tiny-1f2e.sock \
        --data-socket /run/moc/tiny-1f2e-data.sock --parent-pid 1234

The worker connects a ZMQ PAIR socket to the supervisor's endpoint (the control socket), says
Hello, loads what the LoadSpec names, replies with what the load cost (measured, not estimated),
then serves until Shutdown. Requests come only on the Unix stream socket the worker listens on
(from the node's event loop through actors/worker/channel.py, several in flight at once;
actors/worker/links.py): they queue here in arrival order, so the next one starts the moment
the last one ends, and each answer goes back on the link its request came from. A watchdog
thread ends the process as soon as its parent is gone, so a killed node leaves no orphan holding
memory. Imports stay lean: the backend's library is imported only once the LoadSpec says which.

A GGUF model is a batching engine: every request is submitted the moment it arrives and the
loop steps the engine once per turn (actors/worker/batching.py), whatever its `parallel` (one
slot serves them one after another). A torch model runs each request to its end in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

import zmq

from actors.worker.backends import (
    BackendError,
    BadRequest,
    LoadedModel,
    check_generation,
    generation_of,
)
from actors.worker.backends.gguf_engine import GgufEngine
from actors.worker.backends.loader import check_model_file, load_model, prepare_crash_reports
from actors.worker.batching import EngineDriver
from actors.worker.links import (
    EXIT_ORPHANED,
    SEND_TIMEOUT_S,
    ControlSocket,
    DataLink,
    listen,
)
from actors.worker.memory import huge_pages_mb, nvml_process_mb, nvml_used_mb, rss_mb
from actors.worker.native_crash import install_native_handler
from actors.worker.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Done,
    Embed,
    Failed,
    Hello,
    Infer,
    Loaded,
    LoadFailed,
    LoadSpec,
    Message,
    ProtocolError,
    SetThreads,
    Shutdown,
    Token,
    decode,
)

# Exit codes, so the supervisor's log says why a worker went away.
EXIT_OK = 0
EXIT_LOAD_FAILED = 3
EXIT_PROTOCOL = 5

_POLL_MS = 200  # how often an idle worker wakes to notice a lost supervisor
_WATCHDOG_S = 0.1
_LOOK_EVERY_S = 0.005  # how often a running request checks for a Cancel (cancel latency)
_SEND_TIMEOUT_MS = SEND_TIMEOUT_S * 1000


def import_backend_library(backend: str) -> None:
    """Import the backend's native library up front, so its own pages do not count as the model's.

    A missing library is ignored here: the load itself reports it with a clear message.
    """
    module = {"gguf": "llama_cpp", "torch": "torch"}.get(backend)
    if module is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)


_crash_file: IO[str] | None = None


def _crash_log() -> IO[str]:
    """Return a file on a duplicate of stderr, kept open for the life of the process."""
    global _crash_file
    if _crash_file is None:
        _crash_file = os.fdopen(os.dup(2), "w")
    return _crash_file


def record_crashes(backend: str | None = None) -> None:
    """Have a fatal signal leave the Python stack, then the native one, in the worker's log.

    The native stack needs a printer from the backend's library (llama.cpp has one), known once
    the LoadSpec names the backend: it is installed as the signal handler, then
    faulthandler is enabled again so that it chains to that handler after writing the Python
    stack (actors/worker/native_crash.py). Through a copy of stderr: llama-cpp-python points fd 2 at
    /dev/null while it loads a model.
    """
    printer = prepare_crash_reports(backend) if backend is not None else None
    if printer is not None:
        faulthandler.disable()
        try:
            install_native_handler(printer)
        except OSError as exc:  # the Python stack alone is still worth having
            print(f"moc worker: a crash will show no native stack: {exc}", file=sys.stderr)
    faulthandler.enable(file=_crash_log())


def start_watchdog(parent_pid: int, exit_code: int = EXIT_ORPHANED) -> threading.Thread:
    """End the process at once when its parent dies (it is re-parented, so getppid changes).

    A thread, not the main loop, so that it also fires during a long native load or decode.
    """

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(exit_code)
            time.sleep(_WATCHDOG_S)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


class Worker:
    """The serving loop around the sockets and one loaded model.

    The supervisor's control socket carries the load and, after it, only Shutdown; requests
    and their cancels come on the data links (one per connection to the listening socket).
    """

    def __init__(self, sock: zmq.Socket[bytes], listener: socket.socket) -> None:
        self.sock = sock
        self.control = ControlSocket(sock)
        self.listener = listener
        self.model: LoadedModel | None = None  # a torch model: one request at a time
        self.driver: EngineDriver | None = None  # or a GGUF model's batching engine
        self.shutdown = False
        self.rss_before = 0.0
        self.gpu_mb: float | None = None  # measured once: GPU buffers are all allocated at load
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        # The poller names plain sockets by descriptor: these map them back.
        self.listen_fd = listener.fileno()
        self.poller.register(self.listen_fd, zmq.POLLIN)
        self.links: dict[int, DataLink] = {}
        self.pending: deque[tuple[DataLink, Infer]] = deque()
        self.current: tuple[DataLink, int] | None = None
        self.current_cancelled = False

    def memory_mb(self) -> float:
        """Return the model's memory now: its GPU share, or the RSS growth since before load."""
        if self.gpu_mb is not None:
            return self.gpu_mb
        return max(0.0, rss_mb() - self.rss_before)

    def recv(self, timeout_ms: int) -> Message | None:
        """Return the next control message, or None when none arrives within `timeout_ms`."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return decode(self.sock.recv())

    def take(self, timeout_ms: int) -> None:
        """Take every message waiting on any socket: queue requests, apply cancels."""
        for source, _ in self.poller.poll(timeout_ms):
            if source is self.sock:
                self._take_control()
            elif source == self.listen_fd:
                self._connect()
            else:
                self._take_stream(self.links[source])

    def _take_control(self) -> None:
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frame)
            except ProtocolError as exc:
                print(f"moc worker: dropping a bad frame: {exc}", file=sys.stderr)
                continue
            if isinstance(msg, Shutdown):
                self.shutdown = True
            elif isinstance(msg, SetThreads):  # between two steps or requests: safe
                if self.driver is not None:
                    self.driver.engine.set_threads(msg.n_threads)
                elif self.model is not None:
                    self.model.set_threads(msg.n_threads)
                print(f"moc worker: computing with {msg.n_threads} thread(s)", file=sys.stderr)
            else:  # requests come on the data links
                print(f"moc worker: unexpected {type(msg).__name__} on control", file=sys.stderr)

    def _connect(self) -> None:
        with contextlib.suppress(BlockingIOError):  # another poll took it first
            conn, _ = self.listener.accept()
            link = DataLink(conn)
            self.links[link.fileno()] = link
            self.poller.register(link.fileno(), zmq.POLLIN)

    def _take_stream(self, link: DataLink) -> None:
        messages = _read(link)
        if messages is None:
            self._drop(link)
            return
        for msg in messages:
            self.accept(link, msg)

    def _drop(self, link: DataLink) -> None:
        """Forget a closed data link: its queued requests, and the running one at its next look."""
        fd = link.fileno()
        self.poller.unregister(fd)
        del self.links[fd]
        link.close()
        self.pending = deque(item for item in self.pending if item[0] is not link)
        if self.driver is not None:
            self.driver.drop(link)
        if self.current is not None and self.current[0] is link:
            self.current_cancelled = True

    def accept(self, link: DataLink, msg: Message) -> None:
        """Act on one message from a data link, while serving or idle."""
        if isinstance(msg, Infer):
            if self.driver is not None:
                self.driver.submit(link, msg)
            else:
                self.pending.append((link, msg))
        elif isinstance(msg, Embed):
            if self.driver is not None:
                self.driver.embed(link, msg)
            else:
                why = "a tensor model has no embeddings; embed with a GGUF model"
                link.send(Failed(msg.request_id, "invalid_request", "model", why))
        elif isinstance(msg, Cancel):
            self.cancel(link, msg.request_id)
        else:
            print(f"moc worker: unexpected {type(msg).__name__} on a data link", file=sys.stderr)

    def cancel(self, link: DataLink, rid: int) -> None:
        """Cancel the running request between tokens, or a queued one before it starts."""
        if self.driver is not None:
            self.driver.cancel(link, rid)
            return
        if self.current == (link, rid):
            self.current_cancelled = True
            return
        for queued in self.pending:
            if queued[0] is link and queued[1].request_id == rid:
                self.pending.remove(queued)
                link.send(Done(rid, "", 0, 0, "cancelled", None, self.memory_mb()))
                return
        # Otherwise it already finished: its Done is on the way.

    def load(self, spec: LoadSpec) -> bool:
        """Load the model, measure what it cost and tell the supervisor; False on failure."""
        device = spec.device_index or 0
        started = time.monotonic()
        try:
            check_model_file(spec)
            # This thread's priority (Linux's nice is a thread's): the backend's threads, started
            # from here, inherit it.
            os.nice(spec.nice)
            import_backend_library(spec.backend)
            record_crashes(spec.backend)
            self.rss_before = rss_mb()
            gpu_before = nvml_used_mb(device) if spec.on_gpu else None
            loaded = load_model(spec)
            if isinstance(loaded, GgufEngine):
                self.driver = EngineDriver(loaded, self.memory_mb)
            else:
                self.model = loaded
        except BackendError as exc:
            self.control.send(LoadFailed(str(exc)))
            return False
        except Exception as exc:  # a bug or an unexpected library error: still say why
            self.control.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
            return False
        seconds = time.monotonic() - started
        if spec.on_gpu:
            gpu = nvml_process_mb(device, os.getpid())
            if gpu is None and gpu_before is not None:
                after = nvml_used_mb(device)
                gpu = None if after is None else max(0.0, after - gpu_before)
            self.gpu_mb = gpu  # None: NVML cannot say, so fall back to host RSS
        measured = self.memory_mb()
        print(
            f"moc worker: loaded in {seconds:.1f} s; the process holds "
            f"{huge_pages_mb():.0f} MiB of host memory in transparent huge pages",
            file=sys.stderr,
            flush=True,
        )
        if self.driver is not None:
            model: LoadedModel | GgufEngine = self.driver.engine
            template = self.driver.engine.chat_template
        else:
            assert self.model is not None
            model, template = self.model, ""  # a tensor model takes no chat
        self.control.send(
            Loaded(os.getpid(), measured, seconds, model.version, model.n_ctx, template)
        )
        return True

    def close(self) -> None:
        """Free the model (an engine first cancels, and answers, what it still holds)."""
        if self.driver is not None:
            self.driver.close()
        if self.model is not None:
            self.model.close()

    def serve(self, link: DataLink, msg: Infer) -> None:
        """Run one torch request to completion, cancellation or failure, and answer it."""
        assert self.model is not None
        rid = msg.request_id
        self.current = (link, rid)
        self.current_cancelled = False

        next_look = time.monotonic() + _LOOK_EVERY_S

        def should_stop() -> bool:
            nonlocal next_look
            # Between tokens, now and then: queue what arrived, notice a Cancel or Shutdown.
            # Polling the sockets at every token was a fifth of a short request's time.
            now = time.monotonic()
            if now >= next_look:
                next_look = now + _LOOK_EVERY_S
                self.take(0)
            return self.current_cancelled or self.shutdown

        emit: Callable[[str], None] = (
            (lambda text: link.send(Token(rid, text))) if msg.stream else (lambda _: None)
        )
        gen = generation_of(msg)
        try:
            check_generation(gen)
            out = self.model.run(gen, emit, should_stop)
        except BadRequest as exc:
            link.send(Failed(rid, "invalid_request", exc.field, exc.message))
            return
        except Exception as exc:
            link.send(Failed(rid, "internal", "", f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self.current = None
        link.send(
            Done(
                rid,
                out.text,
                out.tokens_generated,
                out.prompt_tokens,
                out.finish_reason,
                out.tensors,
                self.memory_mb(),
            )
        )

    def loop(self) -> int:
        """Serve requests in arrival order until Shutdown; return the exit code."""
        if self.driver is not None:
            return self.loop_batched(self.driver)
        while not self.shutdown:
            if not self.pending:
                self.take(_POLL_MS)
                continue
            link, msg = self.pending.popleft()
            self.serve(link, msg)
        return EXIT_OK

    def loop_batched(self, driver: EngineDriver) -> int:
        """Take what arrived (without waiting while the engine has work), then step once."""
        while not self.shutdown:
            self.take(0 if driver.has_work() else _POLL_MS)
            if driver.has_work() and not self.shutdown:
                self._step(driver)
        return EXIT_OK

    def _step(self, driver: EngineDriver) -> None:
        """Step once with every link held: each link gets the step's answers in one write (more
        when first tokens from saved logits leave before or during the decode)."""
        links = list(self.links.values())
        later: list[tuple[DataLink, Message | None]] = []

        def flush() -> None:
            for link in links:
                link.release()
                link.hold()

        def during(decoded_fd: int) -> None:
            self._beside_decode(driver, decoded_fd, flush, later)

        for link in links:
            link.hold()
        try:
            driver.step(flush, during)
        finally:
            for link in links:
                link.release()
        for link, msg in later:  # what came during the decode, in order
            if self.links.get(link.fileno()) is not link:
                continue  # dropped meanwhile
            if msg is None:
                self._drop(link)
            else:
                self.accept(link, msg)

    def _beside_decode(
        self,
        driver: EngineDriver,
        decoded_fd: int,
        flush: Callable[[], None],
        later: list[tuple[DataLink, Message | None]],
    ) -> None:
        """While the engine decodes (on the main thread; this runs on the engine's other one),
        take requests from the data links: one whose prompt is cached gets its first token now
        (its time to first token is then not a whole decode), the rest of what comes waits in
        `later` for the step to end. Returns once `decoded_fd` is readable."""
        poller = zmq.Poller()
        poller.register(decoded_fd, zmq.POLLIN)
        for fd in self.links:
            poller.register(fd, zmq.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            for fd in ready - {decoded_fd}:
                link = self.links[fd]
                messages = _read(link)
                if messages is None:
                    poller.unregister(fd)  # a closed socket stays readable
                    later.append((link, None))
                    continue
                for msg in messages:
                    if isinstance(msg, Infer):
                        driver.submit(link, msg)
                    else:
                        later.append((link, msg))
            if driver.admit_cached():
                flush()
            if decoded_fd in ready:
                return


def _read(link: DataLink) -> list[Message] | None:
    """Return the messages a data link holds now, or None when it closed or sent garbage."""
    try:
        return link.read()
    except ProtocolError as exc:
        print(f"moc worker: closing a data link that sent garbage: {exc}", file=sys.stderr)
        return None


def run_worker(endpoint: str, data_socket: str, parent_pid: int) -> int:
    """Connect, load and serve; return the process exit code."""
    # Ctrl-C in a terminal reaches the whole process group: the node drains its requests and
    # then stops us, so a SIGINT must not kill the worker under an in-flight request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A crash inside llama.cpp or torch then leaves the Python stack in the worker's log; the
    # LoadSpec adds the native stack (record_crashes again, with its backend).
    record_crashes()
    start_watchdog(parent_pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 1000)  # let the last reply leave before the process exits
    sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
    sock.connect(endpoint)
    # Listening before Hello, so the data socket exists by the time the supervisor hears from us.
    listener = listen(data_socket)
    worker = Worker(sock, listener)
    try:
        worker.control.send(Hello(PROTOCOL_VERSION, os.getpid()))
        msg = None
        while msg is None:
            msg = worker.recv(_POLL_MS)
        if isinstance(msg, Shutdown):
            return EXIT_OK
        if not isinstance(msg, LoadSpec):
            print(f"moc worker: expected LoadSpec, got {type(msg).__name__}", file=sys.stderr)
            return EXIT_PROTOCOL
        if not worker.load(msg):
            return EXIT_LOAD_FAILED
        return worker.loop()
    except ProtocolError as exc:
        print(f"moc worker: protocol error: {exc}", file=sys.stderr)
        return EXIT_PROTOCOL
    finally:
        worker.close()
        sock.close()
        listener.close()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the worker."""
    parser = argparse.ArgumentParser(description="moc-node model worker (started by the node)")
    parser.add_argument("--endpoint", required=True, help="ZMQ endpoint of the supervisor")
    parser.add_argument(
        "--data-socket", required=True, help="Unix socket path to listen on for requests"
    )
    parser.add_argument("--parent-pid", type=int, default=os.getppid(), help="exit when it dies")
    args = parser.parse_args(argv)
    return run_worker(args.endpoint, args.data_socket, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
