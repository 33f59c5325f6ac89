"""The worker's data links, in process: requests queue per link and leave with it."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from actors.worker.links import DataLink, listen
from actors.worker.main import Worker
from actors.worker.protocol import Cancel, Done, FrameReader, Infer, Token, frame_bytes
from tests.support import wait_until


def infer(rid: int) -> Infer:
    return Infer(rid, False, "hello", None, None, 400, 0.7, 0.9, (), None)


@pytest.fixture
def worker(runtime_dir: Path) -> Iterator[Worker]:
    ctx = zmq.Context()
    control = ctx.socket(zmq.PAIR)
    control.bind(f"ipc://{runtime_dir}/control.sock")
    listener = listen(str(runtime_dir / "data.sock"))
    w = Worker(control, listener)
    yield w
    for link in list(w.links.values()):
        link.close()
    listener.close()
    control.close(linger=0)
    ctx.term()


def connect(worker: Worker) -> socket.socket:
    assert worker.listener is not None
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link.connect(worker.listener.getsockname())
    return link


def take_until(worker: Worker, done: Callable[[], object], what: str = "the messages") -> None:
    """Let the worker take what arrived until `done()` holds (10 s at most)."""

    def took() -> bool:
        worker.take(10)
        return bool(done())

    wait_until(took, 10, what)


def test_requests_from_a_link_queue_in_arrival_order(worker: Worker) -> None:
    link = connect(worker)
    link.sendall(b"".join(frame_bytes(infer(rid)) for rid in (1, 2, 3)))
    take_until(worker, lambda: len(worker.pending) == 3)
    assert [msg.request_id for _, msg in worker.pending] == [1, 2, 3]
    link.close()


def test_a_link_that_closes_takes_its_queued_requests_with_it(worker: Worker) -> None:
    staying, leaving = connect(worker), connect(worker)
    staying.sendall(frame_bytes(infer(1)))
    leaving.sendall(frame_bytes(infer(1)) + frame_bytes(infer(2)))
    take_until(worker, lambda: len(worker.pending) == 3)
    leaving.close()
    take_until(worker, lambda: len(worker.pending) == 1)
    data_link, msg = worker.pending[0]
    assert msg.request_id == 1 and not data_link.closed
    staying.close()


def test_a_queued_request_cancelled_from_its_link_is_answered_cancelled(worker: Worker) -> None:
    link = connect(worker)
    link.sendall(frame_bytes(infer(5)) + frame_bytes(Cancel(5)))
    take_until(worker, lambda: select.select([link], [], [], 0)[0])
    assert not worker.pending
    (reply,) = FrameReader().feed(link.recv(4096))
    assert isinstance(reply, Done)
    assert (reply.request_id, reply.finish_reason) == (5, "cancelled")
    link.close()


def test_a_link_whose_peer_left_before_its_answer_is_dropped_without_ending_the_worker(
    worker: Worker,
) -> None:
    link = connect(worker)
    link.sendall(frame_bytes(infer(7)))
    take_until(worker, lambda: len(worker.pending) == 1)
    data_link, _ = worker.pending[0]
    link.close()  # the node gave up on the request while it ran
    data_link.send(Token(7, "lost"))  # EPIPE: dropped
    assert data_link.closed
    take_until(worker, lambda: not worker.links, "the closed link to be dropped")
    assert not worker.pending


def test_a_held_link_writes_nothing_until_release_then_every_frame_in_order_at_once() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = DataLink(ours)
    link.hold()
    for rid in (1, 2, 3):
        link.send(Token(rid, f"piece {rid}"))
    assert select.select([theirs], [], [], 0.05)[0] == []  # nothing written while held
    link.release()
    reader = FrameReader()
    assert select.select([theirs], [], [], 5)[0] == [theirs]
    got = reader.feed(theirs.recv(1 << 16))  # one write: every frame in one read
    assert got == [Token(1, "piece 1"), Token(2, "piece 2"), Token(3, "piece 3")]
    link.send(Token(4, "direct"))  # released: sent at once again
    assert select.select([theirs], [], [], 5)[0] == [theirs]
    assert reader.feed(theirs.recv(1 << 16)) == [Token(4, "direct")]
    link.close()
    theirs.close()


def test_releasing_a_held_link_whose_peer_left_drops_its_frames_and_marks_it_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = DataLink(ours)
    link.hold()
    link.send(Token(1, "lost"))
    theirs.close()
    link.release()
    assert link.closed
    link.close()
