"""The proper-noun tokenizer's fast paths agree with the straightforward scan."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.privacy.names import _TITLES, _TOKEN, ProperNounRecognizer


def _reference_tokens(text: str) -> list[tuple[int, int, str]]:
    out = []
    for m in re.finditer(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*\.?", text):
        word, (start, end) = m.group(0), m.span()
        if word[-1] == "." and len(word) != 2 and word.lower() not in _TITLES:
            word, end = word[:-1], end - 1
        if word[-2:] in ("'s", "’s"):
            word, end = word[:-2], end - 2
        if word:
            out.append((start, end, word))
    return out


_PIECES = st.sampled_from(
    ["Ann", "o", "'", "’", "s", "-", ".", " ", "Dr", "J", "9", "_", "é", "Öz", "ß", "\n", "İ", "x"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_tokens_match_the_reference_scan(text):
    assert [tuple(t) for t in ProperNounRecognizer._tokens(text)] == _reference_tokens(text)


def test_token_pattern_is_the_reference_one():
    assert _TOKEN.pattern == r"[^\W\d_]+(?:[-'’][^\W\d_]+)*\.?"
