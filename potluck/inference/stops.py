"""Stop-sequence handling on a stream of text pieces.

Text that could be the beginning of a stop string is held back until it is known not to be
one, so a stop string is never emitted, even when it is split across tokens.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces; get back the text that is safe to emit.

    Example::

        m = StopMatcher(["\\nUser:"])
        m.feed("Hi\\nUs")   # -> "Hi"   ("\\nUs" held back)
        m.feed("er: x")     # -> ""     and m.stopped is True
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece``; return text that can be emitted now (never part of a stop string)."""
        if self.stopped:
            return ""
        text = self._held + piece
        if not self._stops:
            self._held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Text still held back when the stream ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
