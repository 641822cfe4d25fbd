"""The sanitizer: detect sensitive spans and replace each with its typed placeholder.

One :meth:`Sanitizer.sanitize` call covers every text of one request (all messages of a chat
history) with one :class:`~potluck.privacy.placeholders.PlaceholderMap`, so a value gets the
same placeholder wherever it appears. Fail closed: any failure raises
:class:`~potluck.errors.PrivacyError` and no sanitized text exists to be sent.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from potluck.errors import PrivacyError
from potluck.privacy.analyzer import Detector
from potluck.privacy.placeholders import PlaceholderMap
from potluck.privacy.restore import Restorer


@dataclass(frozen=True)
class Replacement:
    """One replaced span: offsets into the *original* text (``str`` indices)."""

    entity_type: str
    start: int
    end: int
    placeholder: str


@dataclass(frozen=True)
class Sanitized:
    """The result for one request.

    Attributes:
        texts: sanitized texts, same order and count as the input.
        replacements: per input text, the spans replaced in it.
        placeholders: the mapping (memory only; never send or log it).
    """

    texts: tuple[str, ...]
    replacements: tuple[tuple[Replacement, ...], ...]
    placeholders: PlaceholderMap

    def entity_counts(self) -> dict[str, int]:
        """Number of replaced spans per entity type (for the audit log)."""
        return dict(Counter(r.entity_type for reps in self.replacements for r in reps))

    def restorer(self) -> Restorer:
        return Restorer(self.placeholders.mapping)

    def digest(self) -> str:
        """SHA-256 (hex) of the sanitized texts, NUL-separated: what left the node, without content."""
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode())
            h.update(b"\0")
        return h.hexdigest()


class Sanitizer:
    """Detector + placeholders. Thread-safe for concurrent requests (no per-request state here)."""

    def __init__(self, detector: Detector | None = None) -> None:
        self.detector = detector or Detector()

    def sanitize(self, texts: Sequence[str]) -> Sanitized:
        """Replace every sensitive span of every text with its placeholder.

        Raises:
            PrivacyError: detection failed (nothing may be sent).
        """
        pmap = PlaceholderMap()
        pmap.reserve_from(texts)
        out_texts: list[str] = []
        out_reps: list[tuple[Replacement, ...]] = []
        for text in texts:
            spans = self.detector.detect(text)
            parts: list[str] = []
            reps: list[Replacement] = []
            pos = 0
            for span in spans:
                if span.start < pos:  # detect() returns disjoint spans; anything else is a bug
                    raise PrivacyError("overlapping detections reached the sanitizer; nothing was sent")
                ph = pmap.placeholder_for(text[span.start : span.end], span.entity_type)
                parts += [text[pos : span.start], ph]
                reps.append(Replacement(span.entity_type, span.start, span.end, ph))
                pos = span.end
            parts.append(text[pos:])
            out_texts.append("".join(parts))
            out_reps.append(tuple(reps))
        return Sanitized(tuple(out_texts), tuple(out_reps), pmap)
