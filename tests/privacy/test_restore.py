from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.privacy.restore import Restorer

MAPPING = {"<PERSON_1>": "Ada Lovelace", "<EMAIL_ADDRESS_1>": "ada@example.org", "<PERSON_2>": "Bob"}


def test_canonical_and_variants():
    r = Restorer(MAPPING)
    assert r.restore("Hi <PERSON_1>!") == "Hi Ada Lovelace!"
    assert r.restore("<person_1> / PERSON_1 / <PERSON 1> / [PERSON_2] / {Person_2}") == (
        "Ada Lovelace / Ada Lovelace / Ada Lovelace / Bob / Bob"
    )
    assert r.restore("mail <email address 1> or EMAIL_ADDRESS_1") == "mail ada@example.org or ada@example.org"


def test_unknown_and_lookalikes_untouched():
    r = Restorer(MAPPING)
    text = "<PERSON_3> PERSON_12 person_1 <LOCATION_1> xPERSON_1 PERSON_1x <PERSON_1]"
    # lower case without brackets, other numbers/types, glued letters and mismatched brackets stay
    assert r.restore(text) == text


def test_empty_mapping_is_identity():
    assert Restorer({}).restore("<PERSON_1>") == "<PERSON_1>"


def _chunks(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


REPLY = "Dear <PERSON_1>, I wrote to <email_address_1> and PERSON_2 (not <PERSON_9>) <PERSON 1>."


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=30))
@settings(max_examples=300, deadline=None)
def test_stream_equals_whole_for_any_chunking(cuts):
    r = Restorer(MAPPING)
    s = r.stream()
    out = "".join(s.feed(c) for c in _chunks(REPLY, cuts)) + s.flush()
    assert out == r.restore(REPLY)
    assert "Ada Lovelace" in out and "<PERSON_9>" in out


def test_stream_char_by_char_holds_only_placeholder_prefixes():
    s = Restorer(MAPPING).stream()
    assert s.feed("Hello ") == "Hello "
    assert s.feed("<PER") == ""
    assert s.feed("SON_1") == ""
    assert s.feed("> bye") == "Ada Lovelace bye"
    assert s.feed(" P") == " "  # "P" could start PERSON_1: held
    assert s.feed("aris") == "Paris"
    assert s.flush() == ""
