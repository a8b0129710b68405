"""Stop strings over streamed text: the text is cut before the first stop string, and the end of
each piece that could begin one is held back until the next piece decides."""

from __future__ import annotations


class StopText:
    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to send."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:keep], self.pending[keep:]
        return out

    def flush(self) -> str:
        """At the end: what was held back (no stop string followed)."""
        out, self.pending = self.pending, ""
        return out
