"""ID numbers that follow an explicit cue (driver's licence, national/tax/member ID ...) are replaced."""

from __future__ import annotations

import pytest

CASES = [
    ("My license number is D123-4567-8901, please update it.", "D123-4567-8901"),
    ("driver's license: S530-4127-8365-21", "S530-4127-8365-21"),
    ("Drivers license number 4829173 (California).", "4829173"),
    ("Driving licence no. MORGA753116SM9IJ", "MORGA753116SM9IJ"),
    ("DL # K0129-88412 expires in March", "K0129-88412"),
    ("ID number 123 456 789 for the form", "123 456 789"),
    ("My national ID: 7812 0345 6789.", "7812 0345 6789"),
    ("Tax ID 12-3456789 goes on the invoice.", "12-3456789"),
    ("taxpayer identification number is 912-34-5678x", "912-34-5678x"),
    ("member number is A1234567", "A1234567"),
    ("Membership no. 99812734.", "99812734"),
    ("employee ID: E-20931", "E-20931"),
    ("identification number: 4F-556-12", "4F-556-12"),
    ("patient ID #PT-004512 was admitted", "PT-004512"),
]


@pytest.mark.parametrize(("text", "value"), CASES)
def test_cued_id_number_is_replaced_and_restored(sanitizer, text, value):
    result = sanitizer.sanitize([text])
    out = result.texts[0]
    assert value not in out, out
    assert "<ID_NUMBER_1>" in out, out
    assert result.restorer().restore(out) == text


@pytest.mark.parametrize(
    "text",
    [
        "I renewed my license in 2019 and my ID card is valid.",  # no number after the cue
        "Order number 4452 shipped on 12 May 2024.",  # not an ID cue
        "The license is MIT and the ID column is a UUID.",  # no digits
        "room number 12",
        "my member number is in the drawer",
    ],
)
def test_no_cue_or_no_number_is_left_alone(sanitizer, text):
    assert "ID_NUMBER" not in sanitizer.sanitize([text]).texts[0]


def test_same_number_twice_gets_one_placeholder(sanitizer):
    out = sanitizer.sanitize(["License number: X1234567. Again, license number X1234567."]).texts[0]
    assert out.count("<ID_NUMBER_1>") == 2 and "X1234567" not in out
