"""Stop strings applied to decoded text, across token boundaries.

A stop string may be split over several tokens ("\\nUs" + "er:"), so text that could be the start of
a stop string is held back until it is either completed (generation stops, the stop string is never
emitted) or ruled out (the held text is released).
"""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Feed text deltas in, get back the text that is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible start of a stop string)."""
        return self._held

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return ``(text to emit, stopped)``.

        On a stop, the text up to the earliest stop occurrence is returned and everything after it is
        dropped; further calls return ``("", True)``.
        """
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        buffer = self._held + delta
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:cut], True
        keep = self._longest_partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Release the held text (generation ended without completing a stop string)."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    def _longest_partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
