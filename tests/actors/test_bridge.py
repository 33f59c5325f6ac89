"""The bridge from actor replies to the event loop: no thread waits, errors arrive as raised."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pykka
import pytest

from actors.bridge import LoopReplyActor, ask, reply_on_loop


class Echo(LoopReplyActor):
    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self._gate = gate

    def echo(self, value: int) -> int:
        return value

    def later(self, value: int) -> int:
        self._gate.wait(5)  # answers only once the test opens the gate
        return value

    def fail(self) -> None:
        raise ValueError("refused")


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def echo(gate: threading.Event) -> Iterator[pykka.ActorRef[Echo]]:
    ref = Echo.start(gate)
    yield ref
    gate.set()
    ref.stop()


async def test_ask_returns_what_the_actor_answered(echo: pykka.ActorRef[Echo]) -> None:
    assert await ask(echo.proxy().echo(7)) == 7


async def test_ask_raises_the_error_the_actor_raised(echo: pykka.ActorRef[Echo]) -> None:
    with pytest.raises(ValueError, match="refused"):
        await ask(echo.proxy().fail())


async def test_the_loop_keeps_running_while_an_actor_has_not_answered(
    echo: pykka.ActorRef[Echo], gate: threading.Event
) -> None:
    answer = asyncio.ensure_future(ask(echo.proxy().later(3)))
    for _ in range(5):  # the loop turns: nothing blocks it while the actor waits
        await asyncio.sleep(0)
    assert not answer.done()
    gate.set()
    assert await asyncio.wait_for(answer, 5) == 3


async def test_ask_of_an_answer_already_given_returns_it(echo: pykka.ActorRef[Echo]) -> None:
    future = echo.proxy().echo(5)
    future.get(timeout=5)  # set before ask adds its callback
    assert await ask(future) == 5


async def test_ask_of_a_stopped_actor_raises_actor_dead(echo: pykka.ActorRef[Echo]) -> None:
    proxy = echo.proxy()
    echo.stop()
    with pytest.raises(pykka.ActorDeadError):
        await ask(proxy.echo(1))


async def test_ask_refuses_a_plain_pykka_future() -> None:
    with pytest.raises(TypeError, match="LoopReplyActor"):
        await ask(pykka.ThreadingFuture())


async def test_a_reply_from_another_thread_settles_the_loop_future_once() -> None:
    future, reply = reply_on_loop(asyncio.get_running_loop())
    thread = threading.Thread(target=lambda: (reply("first", None), reply("second", None)))
    thread.start()
    assert await asyncio.wait_for(future, 5) == "first"
    thread.join()


async def test_a_reply_with_an_error_raises_it_on_the_loop() -> None:
    future, reply = reply_on_loop(asyncio.get_running_loop())
    threading.Thread(target=reply, args=(None, KeyError("gone"))).start()
    with pytest.raises(KeyError, match="gone"):
        await asyncio.wait_for(future, 5)


def test_a_reply_after_the_loop_closed_is_dropped() -> None:
    loop = asyncio.new_event_loop()
    future, reply = reply_on_loop(loop)
    loop.close()
    reply("late", None)  # nobody waits: no error escapes into the actor's thread
    assert not future.done()
