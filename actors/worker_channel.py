"""The event loop's side of a worker's data socket: many requests in flight, answered by id.

The ModelActor starts, restarts and stops the worker process from its thread; requests go from
the event loop straight to the worker over this channel, with no thread in between. Each request
gets an id and a queue; one reader task hands every reply to its request's queue. The worker
queues what it receives, so the next request starts the moment the last one ends.

A worker that dies is noticed at once through a pidfd (a file descriptor the kernel makes
readable when the process exits), and every request in flight fails with WorkerCrashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncGenerator

import zmq

from actors.errors import InvalidRequest, MocError, RequestTimeout, WorkerCrashed
from actors.loop_socket import LoopSocket
from actors.types import InferRequest, InferResult
from actors.worker_client import WorkerProcess, infer_message, result_of
from actors.worker_protocol import (
    Cancel,
    Done,
    Failed,
    Message,
    ProtocolError,
    Token,
    decode,
    encode,
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

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.closed: WorkerCrashed | None = None
        self.crash_counted = False  # the lane counts a worker's death once, however many it failed
        self._waiting: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(worker.data_endpoint)
        self._loop = asyncio.get_running_loop()
        self._sock = LoopSocket(sock, self._on_frames)
        self._pidfd = _watch_exit(self._loop, worker, self._on_exit)

    @property
    def in_flight(self) -> int:
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

    def close(self) -> None:
        """Fail what is in flight and let go of the socket (the worker itself is the actor's)."""
        self._fail(WorkerCrashed(f"the channel to {self.worker.spec.name} was closed"))
        self._sock.close()

    # -- internals -------------------------------------------------------------------------

    def _open(
        self, req: InferRequest, deadline: float | None, *, stream: bool
    ) -> tuple[int, _Request]:
        if self.closed is not None:
            raise self.closed
        rid = next(self._ids)
        pending = self._waiting[rid] = _Request()
        if deadline is not None:
            # A timer, not asyncio.timeout: a stream's deadline may pass while its consumer is
            # busy elsewhere, and must not cancel the consumer's task there.
            late = RequestTimeout(f"request to {self.worker.spec.name} passed its deadline")
            pending.timer = self._loop.call_at(deadline, pending.replies.put_nowait, late)
        try:
            self._sock.send([encode(infer_message(rid, req, stream=stream))])
        except zmq.ZMQError as exc:  # Again: a full queue; the bulkhead keeps it from filling
            self._forget(rid)
            raise WorkerCrashed(
                f"worker for {self.worker.spec.name} is not taking requests"
            ) from exc
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
                f"worker for {self.worker.spec.name} failed the request: {reply.message}"
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
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send([encode(Cancel(rid))])

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            reply = decode(frames[0])
        except ProtocolError as exc:
            self.worker.kill()
            self._fail(WorkerCrashed(f"worker for {self.worker.spec.name} sent garbage: {exc}"))
            return
        self._dispatch(reply)

    def _on_exit(self) -> None:
        # Replies the worker sent just before it exited may still wait in the socket.
        self._sock.drain()
        self._fail(
            WorkerCrashed(
                f"worker for {self.worker.spec.name} {self.worker.describe_end()} "
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
    loop: asyncio.AbstractEventLoop, worker: WorkerProcess, on_exit: object
) -> int | None:
    """Call `on_exit` on the loop when the worker process exits; return the pidfd to close."""
    pid = worker.pid
    if pid is None:
        return None
    fd = os.pidfd_open(pid)
    loop.add_reader(fd, on_exit)  # type: ignore[arg-type]
    return fd
