"""Restoration: typed placeholders in a reply back to the original values, streaming included.

Recognised forms of ``<PERSON_1>``: any case inside brackets (``<person_1>``, ``<PERSON 1>``,
``[PERSON_1]``, ``{ Person_1 }``) and upper case without brackets (``PERSON_1``, ``PERSON 1``).
Placeholders that are not in the mapping (unknown, or the user's own look-alikes that
:class:`~potluck.privacy.placeholders.PlaceholderMap` reserved) are left untouched.

Streaming: :class:`StreamRestorer` holds back the shortest tail of the text seen so far that could
still grow into a placeholder (a partial match, using the ``regex`` module's ``partial=True``),
so a placeholder split across SSE chunks is restored whole and nothing else is delayed.
"""

from __future__ import annotations

import re as _re
from collections.abc import Mapping

import regex

_CANONICAL = _re.compile(r"<([A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)*)_(\d+)>")


class Restorer:
    """Replaces the placeholders of one mapping (``"<PERSON_1>" -> "Ada"``) in text."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._values: dict[tuple[str, int], str] = {}
        for ph, value in mapping.items():
            m = _CANONICAL.fullmatch(ph)
            if m is None:
                raise ValueError(f"not a canonical placeholder: {ph!r}")
            self._values[(m.group(1), int(m.group(2)))] = value
        types = sorted({t for t, _ in self._values}, key=len, reverse=True)
        self._max_len = 2 * max((len(t) for t in types), default=0) + 16
        if not types:
            self._pattern: regex.Pattern[str] | None = None
            return
        alt = "|".join(r"[ _]".join(regex.escape(part) for part in t.split("_")) for t in types)
        self._pattern = regex.compile(
            rf"(?P<open>[<\[{{])[ ]?(?i:(?P<bt>{alt}))[ _](?P<bn>\d{{1,6}})[ ]?(?P<close>[>\]}}])"
            rf"|(?<![A-Za-z0-9_])(?P<t>{alt})[ _](?P<n>\d{{1,6}})(?![A-Za-z0-9_])"
        )

    def _replace(self, m: regex.Match[str]) -> str:
        if m.group("bt") is not None:
            pairs = {"<": ">", "[": "]", "{": "}"}
            if pairs[m.group("open")] != m.group("close"):
                return m.group(0)
            key = (_re.sub(r"[ _]", "_", m.group("bt").upper()), int(m.group("bn")))
        else:
            key = (_re.sub(r"[ _]", "_", m.group("t")), int(m.group("n")))
        return self._values.get(key, m.group(0))

    def restore(self, text: str) -> str:
        """``text`` with every known placeholder replaced by its value."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(self._replace, text)

    def stream(self) -> StreamRestorer:
        """A fresh incremental restorer for one streamed reply."""
        return StreamRestorer(self)


class StreamRestorer:
    """Incremental :meth:`Restorer.restore` over a stream of text chunks.

    ``feed`` returns the restored text that is final so far; ``flush`` returns the rest at the end.
    Concatenating every output equals ``restorer.restore(concatenated input)``.
    """

    def __init__(self, restorer: Restorer) -> None:
        self._r = restorer
        self._buf = ""

    def _hold_from(self) -> int:
        pattern, buf = self._r._pattern, self._buf
        if pattern is None:
            return len(buf)
        for p in range(max(0, len(buf) - self._r._max_len), len(buf)):
            m = pattern.match(buf, p, partial=True)
            if m is not None and m.end() == len(buf) and (m.partial or buf[-1] not in ">]}"):
                hold = p
                break
        else:
            hold = len(buf)
        for m in pattern.finditer(buf, 0, hold + self._r._max_len):  # never cut a whole match in two
            if m.start() < hold < m.end():
                hold = m.start()
        return hold

    def feed(self, chunk: str) -> str:
        """Add ``chunk``; return the restored text that can no longer change."""
        self._buf += chunk
        hold = self._hold_from()
        ready, self._buf = self._buf[:hold], self._buf[hold:]
        return self._r.restore(ready)

    def flush(self) -> str:
        """End of stream: restore and return whatever is held back."""
        ready, self._buf = self._buf, ""
        return self._r.restore(ready)
