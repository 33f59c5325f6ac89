"""The worker's two kinds of socket: the supervisor's control socket, and its data links.

The control socket is the supervisor's ZMQ PAIR socket (Hello, the load and its answer, Shutdown).
A data link is one connection to the Unix stream socket the worker listens on, from the node's
event loop (its other end is a WorkerChannel, actors/worker/channel.py): length-prefixed frames
(actors/worker/protocol.py) written straight into the kernel, with no ZMQ I/O thread on either
side. Under load on few cores each hand-off to such a thread was a wake-up that could preempt
the sender: sends through the ZMQ data socket took ~170 us of the event loop's wall time,
against ~2 us when measured alone.

Requests and their answers travel only on data links. Both answer `send`; a data link whose
peer left drops what it would send (the peer cannot read it) and says so through `closed`,
while a peer that stopped reading for `SEND_TIMEOUT_S` ends the worker: nobody is listening.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys

import zmq

from actors.worker.protocol import READ_CHUNK, FrameReader, Message, encode, frame_bytes

SEND_TIMEOUT_S = 30  # a peer that takes no message for this long has abandoned us
EXIT_ORPHANED = 4


def orphaned() -> SystemExit:
    """Say why the worker ends, and return the exit that ends it."""
    print("moc worker: the supervisor stopped reading; exiting", file=sys.stderr)
    return SystemExit(EXIT_ORPHANED)


class ControlSocket:
    """The supervisor's PAIR socket (its SNDTIMEO set by the caller)."""

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock

    def send(self, msg: Message) -> None:
        """Send one message; exit if the supervisor has stopped listening for long."""
        try:
            self.sock.send(encode(msg))
        except zmq.Again:
            raise orphaned() from None


class DataLink:
    """One connection on the data socket, from the node's event loop."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.fd = conn.fileno()  # kept: a closed socket's fileno() is -1, and the poller needs it
        self.closed = False  # the peer is gone (or we closed the link): sends are dropped
        self._reader = FrameReader()
        self._held: list[bytes] | None = None  # frames kept for one write (see hold)
        # Blocking sends with a kernel timeout; reads never block (MSG_DONTWAIT).
        conn.setblocking(True)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))

    def fileno(self) -> int:
        """Return the connection's descriptor (for the poller), even once closed."""
        return self.fd

    def send(self, msg: Message) -> None:
        """Send one message (or keep it while held); drop it if the peer is gone, exit if it
        stopped reading."""
        if self.closed:
            return
        if self._held is not None:
            self._held.append(frame_bytes(msg))
        else:
            self._write(frame_bytes(msg))

    def hold(self) -> None:
        """Keep what is sent until `release`, which writes it all at once.

        The worker holds its links through a step: the step's Token frames of every stream
        then reach the node in one write, one wake-up of its event loop instead of one each.
        """
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write what was held since `hold` in one go, and send directly again."""
        held, self._held = self._held, None
        if held and not self.closed:
            self._write(b"".join(held))

    def _write(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO passed with the peer's buffer still full
            raise orphaned() from None
        except OSError:  # EPIPE, ECONNRESET: the node closed this link
            # Not closed here: the link stays in the poller until its read says so (_drop).
            self.closed = True

    def read(self) -> list[Message] | None:
        """Return the messages waiting now, or None once the peer has closed the link.

        Raises ProtocolError when the bytes are not frames: a stream cannot be resynchronised,
        so the caller closes the link.
        """
        messages: list[Message] = []
        while True:
            try:
                data = self.conn.recv(READ_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return messages
            except OSError:
                data = b""
            if not data:
                return messages or None
            messages += self._reader.feed(data)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.closed = True
        self.conn.close()


def listen(path: str) -> socket.socket:
    """Bind and listen on the Unix stream socket at `path` (removing a stale file first)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    sock.setblocking(False)
    return sock
