"""Deadlines: many keys, one loop timer, each key expired once when due."""

from __future__ import annotations

import asyncio

from transports.peer.deadlines import Deadlines


async def test_deadlines_expire_each_key_once_when_due_and_never_a_discarded_one() -> None:
    expired: list[str] = []
    done = asyncio.Event()

    def expire(key: str) -> None:
        expired.append(key)
        if key == "late":
            done.set()

    deadlines: Deadlines[str] = Deadlines(expire)
    deadlines.add("late", 0.06)
    deadlines.add("early", 0.02)  # due before the armed timer: armed anew
    deadlines.add("answered", 0.01)
    deadlines.discard("answered")  # its answer came: never expires
    await asyncio.wait_for(done.wait(), 5)
    assert sorted(expired) == ["early", "late"] and len(deadlines) == 0
    deadlines.add("closed", 0.01)
    deadlines.close()
    later = asyncio.Event()
    after: Deadlines[str] = Deadlines(lambda _key: later.set())
    after.add("after", 0.05)  # due after "closed" would have been
    await asyncio.wait_for(later.wait(), 5)
    assert sorted(expired) == ["early", "late"]  # a closed set expires nothing
