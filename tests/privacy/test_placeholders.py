from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.errors import PrivacyError
from potluck.privacy.placeholders import PlaceholderMap


def test_numbered_per_type_and_stable():
    m = PlaceholderMap()
    assert m.placeholder_for("Ada", "PERSON") == "<PERSON_1>"
    assert m.placeholder_for("ada@x.org", "EMAIL_ADDRESS") == "<EMAIL_ADDRESS_1>"
    assert m.placeholder_for("Bob", "PERSON") == "<PERSON_2>"
    assert m.placeholder_for("Ada", "PERSON") == "<PERSON_1>"
    assert m.mapping == {"<PERSON_1>": "Ada", "<EMAIL_ADDRESS_1>": "ada@x.org", "<PERSON_2>": "Bob"}


def test_reserves_lookalikes_in_input():
    m = PlaceholderMap()
    m.reserve_from(["I wrote <PERSON_1> and person 2 and EMAIL ADDRESS 1 literally"])
    assert m.placeholder_for("Ada", "PERSON") == "<PERSON_3>"
    assert m.placeholder_for("a@b.org", "EMAIL_ADDRESS") == "<EMAIL_ADDRESS_2>"
    assert m.placeholder_for("x", "ADDRESS") == "<ADDRESS_2>"  # suffix of EMAIL ADDRESS 1


def test_encrypted_round_trip_and_wrong_key():
    m = PlaceholderMap()
    m.placeholder_for("Ada", "PERSON")
    key = Fernet.generate_key()
    token = m.encrypt(key)
    assert b"Ada" not in token
    back = PlaceholderMap.decrypt(token, key)
    assert back.mapping == m.mapping
    assert back.placeholder_for("Bob", "PERSON") == "<PERSON_2>"
    with pytest.raises(PrivacyError):
        PlaceholderMap.decrypt(token, Fernet.generate_key())
    with pytest.raises(PrivacyError):
        PlaceholderMap.decrypt(token[:-4] + b"AAAA", key)


def _reference_reservations(text: str) -> set[tuple[str, int]]:
    """The straightforward forward scan that ``reserve_from`` must agree with."""
    import re

    out = set()
    for m in re.finditer(r"(?<=[A-Za-z])[ _](\d{1,6})(?!\d)", text):
        before = re.compile(r"(?:[A-Za-z]+[ _]){0,3}[A-Za-z]+$").search(text, max(0, m.start() - 80), m.start())
        if before is not None:
            words = re.split(r"[ _]", before.group(0).upper())
            out.update(("_".join(words[i:]), int(m.group(1))) for i in range(len(words)))
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "PERSON",
                "email",
                "ADDRESS",
                "x",
                " ",
                "_",
                "  ",
                "1",
                "12",
                "1234567",
                "<",
                ">",
                "é",
                "\n",
                "a" * 30,
                "\u0661",
            ]
        ),
        max_size=25,
    ).map("".join)
)
def test_reservations_match_the_forward_scan(text):
    m = PlaceholderMap()
    m.reserve_from([text])
    assert m._reserved == _reference_reservations(text)
