"""Stop-string matching over streamed text.

Text that could be the start of a stop string is held back until it is
known not to be, so a client never sees part of a stop string.
"""

from __future__ import annotations


class StopMatcher:
    """Feeds text deltas through and cuts the stream at the first stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text that is safe to emit now; sets `stopped` on a match."""
        if not self._stops:
            return delta
        text = self._pending + delta
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self.stopped = True
            return text[:cut]
        if self._hold == 0:
            self._pending = ""
            return text
        safe = len(text) - self._hold
        if safe <= 0:
            self._pending = text
            return ""
        self._pending = text[safe:]
        return text[:safe]

    def flush(self) -> str:
        """Return what is still held back once generation ends without a match."""
        rest, self._pending = self._pending, ""
        return rest
