"""The event loop's side of a worker's data socket: many requests in flight, answered by id.

The ModelActor starts, restarts and stops the worker process from its thread; requests go from
the event loop straight to the worker over this channel, with no thread in between: a Unix
stream socket written and read from the loop's descriptor callbacks, length-prefixed frames
(actors/worker/protocol.py). No ZMQ here: its I/O thread cost a wake-up per send that, on a
busy machine with few cores, preempted the event loop (see actors/worker/links.py). Each
request gets an id and a queue; the read callback hands every reply to its request's queue. The
worker queues what it receives, so the next request starts the moment the last one ends.

A worker that dies is noticed at once through a pidfd (a file descriptor the kernel makes
readable when the process exits), and every request in flight fails with WorkerCrashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from actors.errors import InvalidRequest, MocError, RequestTimeout, WorkerCrashed
from actors.types import EmbedRequest, EmbedResult, FinishReason, InferRequest, InferResult
from actors.worker.protocol import (
    READ_CHUNK,
    Cancel,
    Done,
    Embed,
    Embedded,
    Failed,
    FrameReader,
    Infer,
    Message,
    ProtocolError,
    Token,
    frame_bytes,
)


class ChannelPeer(Protocol):
    """What a channel needs of its worker process (WorkerProcess is the one)."""

    @property
    def name(self) -> str:
        """The model's name, for error messages."""
        ...

    @property
    def data_socket(self) -> str:
        """The Unix socket path the worker listens on."""
        ...

    @property
    def pid(self) -> int | None:
        """The process to watch for its exit (None: never started)."""
        ...

    @property
    def version(self) -> str:
        """The loaded weights' version, for results."""
        ...

    def note_memory(self, mb: float) -> None:
        """Record the memory a Done reported."""
        ...

    def describe_end(self) -> str:
        """Say how the worker ended."""
        ...

    def kill(self) -> None:
        """End a worker that sent garbage."""
        ...


def finish_reason(wire: str) -> FinishReason:
    """Map the wire's finish reason onto the domain's (unknown ones read as "length")."""
    if wire == "stop":
        return "stop"
    if wire == "cancelled":
        return "cancelled"
    return "length"


def infer_message(rid: int, req: InferRequest, *, stream: bool) -> Infer:
    """Put one request on the wire's terms."""
    p = req.params
    return Infer(
        rid,
        stream,
        req.prompt,
        req.messages,
        req.tensors,
        p.max_tokens,
        p.temperature,
        p.top_p,
        tuple(p.stop),
        p.seed,
        p.presence_penalty,
        p.frequency_penalty,
        p.repeat_penalty,
        p.logit_bias,
        p.json_schema,
        p.logprobs,
    )


def result_of(done: Done, started: float, version: str) -> InferResult:
    """Turn the worker's Done into a result; `started` is when the request was sent (monotonic)."""
    return InferResult(
        text=done.text,
        tokens_generated=done.tokens_generated,
        prompt_tokens=done.prompt_tokens,
        finish_reason=finish_reason(done.finish_reason),
        latency_ms=(time.monotonic() - started) * 1000.0,
        model_version=version,
        tensors=done.tensors,
        prompt_tokens_reused=done.prompt_tokens_reused,
        first_token_ms=done.first_token_ms,
        logprobs=done.logprobs,
    )


_Reply = Message | MocError  # an error: the worker died, or the deadline passed


class _Request:
    """One request in flight: where its replies go, and the timer of its deadline."""

    __slots__ = ("replies", "timer", "started")

    def __init__(self) -> None:
        self.replies: asyncio.Queue[_Reply] = asyncio.Queue()
        self.timer: asyncio.TimerHandle | None = None
        self.started = time.monotonic()


class WorkerChannel:
    """Requests from the event loop to one worker process."""

    def __init__(self, worker: ChannelPeer) -> None:
        self.worker = worker
        self.closed: WorkerCrashed | None = None
        self._waiting: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._fd: int | None = None  # the socket's descriptor while it is read
        self._reader = FrameReader()
        self._out = bytearray()  # bytes the kernel has not taken yet (sent when writable)
        self._pidfd: int | None = None
        try:
            # At once: the worker listens before it says Hello.
            self._sock.connect(worker.data_socket)
        except OSError as exc:
            # A worker dying under us: its requests fail like those in flight at its death,
            # through the lane, which counts the crash and restarts it.
            self.closed = WorkerCrashed(
                f"cannot reach the worker for {worker.name}: {exc.strerror or exc}"
            )
            return
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        self._pidfd = _watch_exit(self._loop, worker, self._on_exit)

    @property
    def unanswered(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    async def infer(self, req: InferRequest, deadline: float | None = None) -> InferResult:
        """Run one whole request; `deadline` is monotonic (the event loop's clock)."""
        rid, pending = self._open(req, deadline, stream=False)
        answered = False
        try:
            while True:
                result = self._finish(await pending.replies.get(), pending.started)
                if result is not None:
                    answered = True
                    return result
        finally:
            self._close(rid, answered)

    async def stream(
        self, req: InferRequest, deadline: float | None = None
    ) -> AsyncGenerator[str | InferResult, None]:
        """Yield the request's text piece by piece, then its result."""
        rid, pending = self._open(req, deadline, stream=True)
        answered = False
        try:
            while True:
                reply = await pending.replies.get()
                if isinstance(reply, Token):
                    yield reply.text
                    continue
                result = self._finish(reply, pending.started)
                if result is not None:
                    answered = True
                    yield result
                    return
        finally:
            self._close(rid, answered)

    async def embed(self, req: EmbedRequest, deadline: float | None = None) -> EmbedResult:
        """Embed the request's inputs; `deadline` is monotonic (the event loop's clock)."""
        rid, pending = self._send(lambda rid: Embed(rid, req.inputs), deadline)
        answered = False
        try:
            reply = await pending.replies.get()
            answered = isinstance(reply, Embedded | Failed)
            if isinstance(reply, Embedded):
                self.worker.note_memory(reply.memory_mb)
                return EmbedResult(
                    reply.vectors,
                    reply.prompt_tokens,
                    (time.monotonic() - pending.started) * 1000.0,
                    self.worker.version,
                )
            self._finish(reply, pending.started)  # raises the error a reply carries
            raise WorkerCrashed(f"worker for {self.worker.name} answered an embed with {reply!r}")
        finally:
            self._close(rid, answered)

    def close(self) -> None:
        """Fail what is in flight and let go of the socket (the worker itself is the actor's)."""
        self._fail(WorkerCrashed(f"the channel to {self.worker.name} was closed"))
        self._stop_reading()
        if self._out:
            self._out.clear()
            self._loop.remove_writer(self._sock.fileno())
        self._sock.close()

    # -- internals -------------------------------------------------------------------------

    def _open(
        self, req: InferRequest, deadline: float | None, *, stream: bool
    ) -> tuple[int, _Request]:
        return self._send(lambda rid: infer_message(rid, req, stream=stream), deadline)

    def _send(
        self, message: Callable[[int], Message], deadline: float | None
    ) -> tuple[int, _Request]:
        """Send the request `message(rid)` builds under a fresh id; return the id and its queue."""
        if self.closed is not None:
            raise self.closed
        rid = next(self._ids)
        pending = self._waiting[rid] = _Request()
        if deadline is not None:
            # A timer, not asyncio.timeout: a stream's deadline may pass while its consumer is
            # busy elsewhere, and must not cancel the consumer's task there.
            late = RequestTimeout(f"request to {self.worker.name} passed its deadline")
            pending.timer = self._loop.call_at(deadline, pending.replies.put_nowait, late)
        try:
            self._write(frame_bytes(message(rid)))
        except WorkerCrashed:
            self._forget(rid)
            raise
        return rid, pending

    def _finish(self, reply: _Reply, started: float) -> InferResult | None:
        """Turn a final reply into a result or an error; None for a streamed token."""
        if isinstance(reply, MocError):
            raise reply
        if isinstance(reply, Done):
            self.worker.note_memory(reply.memory_mb)
            return result_of(reply, started, self.worker.version)
        if isinstance(reply, Failed):
            if reply.kind == "invalid_request":
                raise InvalidRequest(reply.field or "request", reply.message)
            raise WorkerCrashed(
                f"worker for {self.worker.name} failed the request: {reply.message}"
            )
        return None

    def _forget(self, rid: int) -> bool:
        pending = self._waiting.pop(rid, None)
        if pending is None:
            return False
        if pending.timer is not None:
            pending.timer.cancel()
        return True

    def _close(self, rid: int, answered: bool) -> None:
        """Forget a request; one left unanswered (cancelled, timed out) is cancelled in the worker."""
        if not self._forget(rid) or answered or self.closed is not None:
            return
        with contextlib.suppress(WorkerCrashed):
            self._write(frame_bytes(Cancel(rid)))

    # -- the socket, from the loop's callbacks ---------------------------------------------

    def _write(self, data: bytes) -> None:
        """Send now if the kernel takes it, else queue it behind what waits (the bulkhead bounds
        the requests in flight, so the queue stays small)."""
        if not self._out:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # EPIPE: the worker closed its end, it is exiting
                raise WorkerCrashed(
                    f"worker for {self.worker.name} is not taking requests"
                ) from exc
            if sent == len(data):
                return
            data = data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._flush)
        self._out += data

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            return
        except OSError:  # the worker is gone: its pidfd fails what is in flight
            sent = len(self._out)
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """Hand what the socket holds to the requests; False when nothing more can come now."""
        if self._fd is None:
            return False
        try:
            data = self._sock.recv(READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # the worker closed its end: it is exiting, its pidfd says how
            self._stop_reading()
            if self._pidfd is None:
                self._fail(WorkerCrashed(f"worker for {self.worker.name} closed its socket"))
            return False
        try:
            replies = self._reader.feed(data)
        except ProtocolError as exc:
            self.worker.kill()
            self._stop_reading()
            self._fail(WorkerCrashed(f"worker for {self.worker.name} sent garbage: {exc}"))
            return False
        for reply in replies:
            self._dispatch(reply)
        return True

    def _stop_reading(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def _on_exit(self) -> None:
        # Replies the worker sent just before it exited may still wait in the socket.
        while self._read_once():
            pass
        self._fail(
            WorkerCrashed(
                f"worker for {self.worker.name} {self.worker.describe_end()} "
                "during the request"
            )
        )

    def _dispatch(self, reply: Message) -> None:
        pending = self._waiting.get(getattr(reply, "request_id", -1))
        if pending is not None:  # else: the answer to a request given up on
            pending.replies.put_nowait(reply)

    def _fail(self, error: WorkerCrashed) -> None:
        if self.closed is None:
            self.closed = error
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        for pending in self._waiting.values():
            pending.replies.put_nowait(error)


def _watch_exit(
    loop: asyncio.AbstractEventLoop, worker: ChannelPeer, on_exit: object
) -> int | None:
    """Call `on_exit` on the loop when the worker process exits; return the pidfd to close."""
    pid = worker.pid
    if pid is None:
        return None
    fd = os.pidfd_open(pid)
    loop.add_reader(fd, on_exit)  # type: ignore[arg-type]
    return fd
