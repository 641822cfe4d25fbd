"""The cheap gates in front of recognizers are necessary conditions: they never hide a detection.

Each gate is checked against the recognizer it guards on generated texts built from the characters
the guarded patterns care about (digits, separators, letters, blanks): whenever the ungated
recognizer finds something, the gate must let the text through.
"""

from __future__ import annotations

import re._parser as sre_parse  # the regex parser, for minimum match widths

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from presidio_analyzer.predefined_recognizers import CreditCardRecognizer, IbanRecognizer, UsSsnRecognizer

from potluck.privacy import analyzer
from potluck.privacy.names import _ORG_CUE_ENDS, _ORG_CUES, _PERSON_CUE_ENDS, _PERSON_CUES
from potluck.privacy.recognizers import OTHER_RULES, SECRET_RULES, SHAPE_RULES

_PIECES = st.sampled_from(
    [
        "1",
        "4",
        "0",
        "12",
        "123",
        "4111",
        "-",
        " ",
        ".",
        "DE",
        "GB",
        "89",
        "x",
        "\n",
        "_",
        "\u0664",
        "\u0661\u0662\u0663",
        "é",
    ]
)
_NUMBERISH = st.lists(_PIECES, min_size=1, max_size=30).map("".join)

GATED = [
    (CreditCardRecognizer(), analyzer._card_hint),
    (IbanRecognizer(), analyzer._IBAN_HINT.search),
    (UsSsnRecognizer(), analyzer._SSN_HINT.search),
]


@pytest.mark.parametrize(("recognizer", "gate"), GATED, ids=lambda x: type(x).__name__)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_NUMBERISH)
def test_presidio_gates_are_necessary(recognizer, gate, text):
    found = [r for r in recognizer.analyze(text, recognizer.supported_entities) if r.score > 0]
    assert not found or gate(text), (text, found)


@pytest.mark.parametrize(
    ("recognizer", "gate", "text"),
    [
        (GATED[0][0], GATED[0][1], "card 4111 1111 1111 1111 ok"),
        (GATED[1][0], GATED[1][1], "DE89 3704 0044 0532 0130 00"),
        (GATED[2][0], GATED[2][1], "ssn 078-05-1120"),
    ],
)
def test_presidio_gates_pass_real_values(recognizer, gate, text):
    assert gate(text)


@pytest.mark.parametrize(
    "rule", [r for r in SECRET_RULES + OTHER_RULES + SHAPE_RULES if r.min_run], ids=lambda r: r.regex.pattern[:24]
)
def test_min_run_is_below_the_shortest_match(rule):
    """A rule skipped because the text has no whitespace-free run of ``min_run`` characters could
    not have matched: its pattern needs at least that many characters without a blank."""
    pattern = rule.regex.pattern
    parsed = sre_parse.parse(pattern, rule.regex.flags)
    if pattern.startswith("-----BEGIN "):  # PEM block: the run is "-----BEGIN"
        width = len("-----BEGIN")
    elif isinstance(rule.group, int) and rule.group and r"\s+(" in pattern:
        width = _group_width(parsed, rule.group)  # "bearer <value>": the captured value is the run
    else:  # the whole match is the run: the pattern can match no blank ("[^\s...]" excludes them)
        assert " " not in pattern and r"\s" not in pattern.replace(r"[^\s", "")
        width = parsed.getwidth()[0]
    assert width is not None and rule.min_run <= width


def _group_width(sub, group):
    """Minimum width of capture group ``group`` in a parsed pattern (``None`` if absent)."""
    for op, av in sub.data:
        children = []
        if op is sre_parse.SUBPATTERN:
            if av[0] == group:
                return av[3].getwidth()[0]
            children = [av[3]]
        elif op is sre_parse.BRANCH:
            children = av[1]
        elif op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):
            children = [av[2]]
        for child in children:
            found = _group_width(child, group)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize(
    ("pattern", "ends", "phrases"),
    [
        (
            _PERSON_CUES,
            _PERSON_CUE_ENDS,
            [
                "my name is",
                "Named",
                "called",
                "I am",
                "i'm",
                "Dear",
                "hi",
                "Hello",
                "thanks",
                "Sincerely,",
                "regards",
                "assistant to",
                "by",
                "with",
                "meet",
                "ask",
                "said",
                "told",
                "contact",
                "last name?",
                "First Name",
                "full name?",
                "User:",
                "patient:",
                "patient",
            ],
        ),
        (
            _ORG_CUES,
            _ORG_CUE_ENDS,
            ["works at", "worked for", "employed by", "joined", "company", "employer", "firm", "at"],
        ),
    ],
)
def test_cue_gates_cover_every_cue(pattern, ends, phrases):
    for phrase in phrases:
        before = f"And so {phrase}  "
        if pattern.search(before):
            assert before.rstrip().lower().endswith(ends), phrase


_HINTED = [r for r in SECRET_RULES + OTHER_RULES + SHAPE_RULES if r.hint is not None]


@pytest.mark.parametrize("rule", _HINTED, ids=lambda r: r.regex.pattern[:24])
@settings(max_examples=150, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(["1", "12", "4111", "-", " ", "de", "GB", "89", "x", "=", ":", "'", '"', "key", "pass"]),
        min_size=1,
        max_size=30,
    ).map("".join)
)
def test_rule_hints_are_necessary(rule, text):
    assert rule.regex.search(text) is None or rule.hint.search(text) is not None, text


@pytest.mark.parametrize(("value", "etype"), [("aa:bb:cc:dd:ee:ff", "MAC_ADDRESS"), ("abcd::ef", "IP_ADDRESS")])
def test_digit_free_identifiers_are_not_skipped(sanitizer, value, etype):
    """The analyzer skips recognizers marked ``needs_digit`` on texts without digits; these values
    have none, so their recognizers must not be marked."""
    result = sanitizer.sanitize([f"the device at {value} is down"])
    assert value not in result.texts[0] and etype in result.entity_counts()


def test_needs_digit_marks_only_digit_patterns(sanitizer):
    recognizers, _, digit_free = sanitizer.detector.engine._recognizers_and_entities()
    skipped = {r.name for r in recognizers} - {r.name for r in digit_free}
    assert skipped == {
        "GatedCreditCardRecognizer",
        "GatedIbanRecognizer",
        "GatedUsSsnRecognizer",
        "GatedCryptoRecognizer",
        "PotluckNumberShapeRecognizer",
        "PotluckIdNumberRecognizer",
        "PotluckPhoneRecognizer",
        "PotluckAddresses",
    }


@pytest.mark.parametrize(
    "text",
    [
        "123-45-6789",
        "123 45 6789",
        "123.45.6789",
        "12345-6789",
        "123-456789",
        "123456789",
        "x123456789",
        "1234567890",
        "a 123-45-6789.",
        "_123456789",
        "4111 1111 1111 1111",
    ],
)
def test_ssn_gate_on_boundaries(text):
    found = [r for r in UsSsnRecognizer().analyze(text, ["US_SSN"]) if r.score > 0]
    assert not found or analyzer._SSN_HINT.search(text), text


def test_no_recognizer_class_shadows_a_presidio_one(sanitizer):
    """presidio loads its predefined recognizers by class name among all subclasses in the process
    (in set order): a second class of the same name breaks a stock engine built alongside ours."""
    from collections import Counter

    from presidio_analyzer.recognizer_registry.recognizers_loader_utils import RecognizerListLoader

    names = Counter(r.__name__ for r in RecognizerListLoader.get_all_existing_recognizers())
    assert [n for n, k in names.items() if k > 1] == []
