"""StopText: a reply's text pieces in, the text that may be shown out, ending before the first stop string.

A stop string is never emitted, even when it spans several tokens: the longest tail of the unshown text that
could still be the start of a stop string is held back until the next piece decides it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopText:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text received but not yet shown
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that can be shown now; sets `stopped` when a stop string completed (its text is dropped)."""
        if self.stopped:
            return ""
        self.pending += piece
        cut = self._cut()
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """At the reply's end: what was held back is not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _cut(self) -> int:
        """Where the text ends when a stop string has completed, else -1: at the first point where one has, the
        earliest start among those complete by then (as if the text had arrived one character at a time)."""
        ends = [i + len(s) for s, i in ((s, self.pending.find(s)) for s in self.stops) if i >= 0]
        if not ends:
            return -1
        seen = self.pending[: min(ends)]
        return min(i for i in (seen.find(s) for s in self.stops) if i >= 0)

    def _held_back(self) -> int:
        """Length of the longest tail of pending that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
