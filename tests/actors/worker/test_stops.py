"""Stop sequences over streamed pieces: stop text is never emitted, even split across tokens."""

from __future__ import annotations

import pytest

from actors.worker.backends.stops import StopMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], str, bool]:
    m = StopMatcher(stops)
    emitted = [m.feed(p) for p in pieces]
    return emitted, "".join(emitted) + m.flush(), m.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        ((), ["ab", "cd"], "abcd", False),
        (("END",), ["abc", "END", "x"], "abc", True),
        (("END",), ["ab", "cE", "N", "Dxyz"], "abc", True),
        (("END",), ["E", "N", "D"], "", True),
        (("END",), ["xE", "NQ", "!"], "xENQ!", False),
        (("END",), ["abE"], "abE", False),
        (("\n\n", "##"), ["a\n", "b#", "#c"], "a\nb", True),
        (("b", "ab"), ["xab"], "x", True),
        (("aaab",), ["aa", "aa", "b"], "a", True),
        (("",), ["abc"], "abc", False),
    ],
    ids=[
        "no-stops",
        "whole-stop-in-one-piece",
        "stop-split-over-three-pieces",
        "stop-only",
        "false-start-is-released",
        "held-prefix-flushed-at-end",
        "second-stop-sequence",
        "earliest-stop-wins",
        "overlapping-prefix",
        "empty-stop-ignored",
    ],
)
def test_stop_text_is_never_emitted(
    stops: tuple[str, ...], pieces: list[str], text: str, stopped: bool
) -> None:
    emitted, whole, did_stop = run(stops, pieces)
    assert whole == text
    assert did_stop is stopped
    for stop in stops:
        if stop:
            assert stop not in "".join(emitted)


def test_a_possible_stop_prefix_is_held_back_until_disproved() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("abST") == "ab"
    assert m.feed("O") == ""
    assert m.feed("x") == "STOx"


def test_nothing_is_emitted_after_a_stop() -> None:
    m = StopMatcher(("!",))
    assert m.feed("hi!there") == "hi"
    assert m.feed("more") == ""
    assert m.flush() == ""
