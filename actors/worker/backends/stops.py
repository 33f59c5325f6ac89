"""Stop sequences over streamed text: emit only what can never become part of a stop sequence.

Pure: feed it the text of each new token, it returns what is safe to emit now. Text that might be
the start of a stop sequence is held back until the next piece proves it is not; a stop sequence
split across any number of tokens is therefore never emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StopMatcher:
    """Hold back text that may begin a stop sequence; report the first complete one."""

    stops: tuple[str, ...]
    _pending: str = field(default="", init=False)
    stopped: bool = field(default=False, init=False)

    def feed(self, piece: str) -> str:
        """Add `piece`; return the text now safe to emit (before any stop sequence)."""
        if self.stopped:
            return ""
        text = self._pending + piece
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        keep = self._held_suffix(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Return the held-back text at the end of generation (no stop sequence came)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops if s) if i >= 0]
        return min(found) if found else None

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
