"""The one bridge from actor threads to the event loop: replies settle an asyncio future.

A pykka future's `get()` blocks, and so does its `await`: the loop must never call either. Every
actor reply reaches the loop the same way: the actor's thread calls `loop.call_soon_threadsafe`
with the outcome, which settles an asyncio future the loop awaits. Two shapes use it:

- `ask(future)`: await what a proxy call returns, for actors built on `LoopReplyActor` (their
  futures call back when set, so no thread waits on them);
- `reply_on_loop(loop)`: an asyncio future and the `(value, error)` callback that settles it,
  for actor methods that answer later, from another message (the manager's `acquire` answers when
  the model's worker has loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pykka
from pykka import ThreadingFuture

T = TypeVar("T")

Reply = Callable[[T | None, Exception | None], None]
"""An answer given later, from any thread: `(value, None)` or `(None, error)`."""


def reply_on_loop(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[Any], Reply[Any]]:
    """Return a future of `loop` and a thread-safe `Reply` that settles it (the first wins)."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: Exception | None) -> None:
        if future.done():  # cancelled meanwhile (the caller left), or answered twice
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def reply(value: Any, error: Exception | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(settle, value, error)

    return future, reply


class CallbackFuture(ThreadingFuture[T], Generic[T]):
    """A pykka future that also calls back once it is set, on the setting thread."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[CallbackFuture[T]], None]] = []
        self._done = False
        self._lock = threading.Lock()

    def add_done_callback(self, callback: Callable[[CallbackFuture[T]], None]) -> None:
        """Call `callback(self)` once a value or error is set (at once if it already is)."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self)

    def set(self, value: Any | None = None) -> None:
        super().set(value)
        self._fire()

    def set_exception(self, exc_info: Any = None) -> None:
        super().set_exception(exc_info)  # None: the exception being handled, as in pykka
        self._fire()

    def _fire(self) -> None:
        with self._lock:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)


class LoopReplyActor(pykka.ThreadingActor):
    """A threading actor whose replies `ask` can await without blocking a thread."""

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        # pykka's own extension point: each actor kind makes the futures its replies go into.
        return CallbackFuture()


async def ask(future: pykka.Future[T]) -> T:
    """Await an actor's reply on the event loop; its error is raised here.

    The actor must be a `LoopReplyActor`: a plain pykka future offers no callback, only a
    blocking `get()`.
    """
    if not isinstance(future, CallbackFuture):
        raise TypeError(f"ask() needs a LoopReplyActor's future, not {type(future).__name__}")
    settled, reply = reply_on_loop(asyncio.get_running_loop())

    def done(answered: CallbackFuture[T]) -> None:
        try:
            value = answered.get(timeout=0)
        except Exception as exc:
            reply(None, exc)
        else:
            reply(value, None)

    future.add_done_callback(done)
    result: T = await settled
    return result


__all__ = ["CallbackFuture", "LoopReplyActor", "Reply", "ask", "reply_on_loop"]
