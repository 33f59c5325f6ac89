"""A ZMQ socket driven straight from the asyncio event loop's file-descriptor callback.

Each message that arrives goes to `on_frames` from that callback: no future, task step or extra
loop turn per message, as `zmq.asyncio` would spend (and `zmq.asyncio` was measured to stall a
reply now and then for hundreds of milliseconds). ZMQ's descriptor is edge-triggered and only
says "look at the socket", and any send may swallow that signal, so every send checks for input
that came meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import zmq

log = logging.getLogger(__name__)

# pyzmq's flags are enum members, which the binding converts slowly (a refused NOBLOCK receive
# cost 12 us with the enum, 5 us with the int): plain ints on this per-message path.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_RCVMORE = int(zmq.RCVMORE)


class LoopSocket:
    """Read and write one ZMQ socket from the running event loop without blocking it."""

    BATCH = 64
    """Messages handled per callback before yielding to the loop (a flood cannot starve it)."""

    def __init__(self, sock: zmq.Socket[bytes], on_frames: Callable[[list[bytes]], None]) -> None:
        self.sock = sock
        self._on_frames = on_frames
        self._loop = asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._scheduled = False
        self._loop.add_reader(self._fd, self.drain)
        self._schedule()  # a message may have come before the reader was added

    def send(self, frames: list[bytes]) -> None:
        """Queue one message without blocking (zmq.Again when the peer's queue is full)."""
        sock = self.sock
        # Frame by frame rather than send_multipart (its per-frame checks and enum flags): a
        # refused first frame sends nothing, and once it is taken ZMQ takes the rest.
        for frame in frames[:-1]:
            sock.send(frame, _SNDMORE_NOBLOCK)
        sock.send(frames[-1], _NOBLOCK)
        if cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
            self._schedule()

    def close(self) -> None:
        """Stop reading and close the socket; safe to call twice."""
        if self.sock.closed:
            return  # its descriptor number may already belong to another socket
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self.sock.close(linger=0)

    def drain(self) -> None:
        """Hand every waiting message to `on_frames` (a batch now, the rest on the next turn)."""
        self._scheduled = False
        sock = self.sock
        for i in range(self.BATCH):
            if sock.closed:
                return
            try:
                # The descriptor only said "look", so the first read just tries; after a
                # message, asking ZMQ for POLLIN costs half a read refused with an exception.
                if i and not cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
                    return
                frames = [sock.recv(_NOBLOCK)]
                while sock.getsockopt(_RCVMORE):
                    frames.append(sock.recv(_NOBLOCK))
            except zmq.Again:
                return  # all read: the descriptor signals the next arrival
            except zmq.ZMQError:  # closed under us
                return
            try:
                self._on_frames(frames)
            except Exception:  # stopping here would strand the messages behind this one
                log.exception("a ZMQ message could not be handled")
        self._schedule()  # more may wait: after the loop has run everyone else

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.drain)
