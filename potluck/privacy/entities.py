"""Detected sensitive spans and the overlap rule that turns raw detections into disjoint spans."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

# Entity types this package emits (presidio names where presidio has one).
PERSON = "PERSON"
ORGANIZATION = "ORGANIZATION"
LOCATION = "LOCATION"
NAME = "NAME"  # a proper noun of unknown kind (person, organisation or place)
STREET_ADDRESS = "STREET_ADDRESS"
ZIP_CODE = "ZIP_CODE"
EMAIL_ADDRESS = "EMAIL_ADDRESS"
PHONE_NUMBER = "PHONE_NUMBER"
CREDIT_CARD = "CREDIT_CARD"
IBAN_CODE = "IBAN_CODE"
US_SSN = "US_SSN"
IP_ADDRESS = "IP_ADDRESS"
MAC_ADDRESS = "MAC_ADDRESS"
CRYPTO = "CRYPTO"
PASSPORT = "PASSPORT"
ID_NUMBER = "ID_NUMBER"  # driver's licence, national/tax/member ID... after an explicit cue
SECRET = "SECRET"


@dataclass(frozen=True, order=True)
class Span:
    """One detected sensitive span of a text.

    Attributes:
        start: offset of the first character (Python ``str`` index).
        end: offset one past the last character.
        entity_type: upper-case type name, e.g. ``"PERSON"``; it names the placeholder.
        score: detector confidence in [0, 1]; ties between overlapping spans of equal length go
            to the higher score.
    """

    start: int
    end: int
    entity_type: str
    score: float = 1.0

    def __len__(self) -> int:
        return self.end - self.start


class Located(Protocol):
    """Anything with offsets and a score: :class:`Span`, presidio's ``RecognizerResult``."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def score(self) -> float: ...


S = TypeVar("S", bound=Located)


def resolve_overlaps(spans: Iterable[S]) -> list[S]:
    """Disjoint spans, sorted by start: of overlapping detections the longest wins.

    Greedy over spans ordered by (length desc, score desc, start asc), keeping each span that
    overlaps none already kept. Adjacent spans (``a.end == b.start``) do not overlap. Empty spans
    are dropped. Returns the kept objects themselves (so callers can resolve raw detections and
    convert only the survivors).
    """
    kept: list[S] = []
    for span in sorted(spans, key=lambda s: (s.start - s.end, -s.score, s.start)):
        start, end = span.start, span.end
        if end <= start:
            continue
        for k in kept:
            if end > k.start and start < k.end:
                break
        else:
            kept.append(span)
    kept.sort(key=lambda s: (s.start, s.end))
    return kept
