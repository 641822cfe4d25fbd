"""Street addresses from a small address grammar (no model).

Street lines, in the three shapes postal conventions use (UPU S42 international address
templates):

* number first, designator last: ``1600 Pennsylvania Avenue NW``, ``14 Crown Street``;
* designator first, number last: ``Rua do Arenque 1634``, ``Via Roma 5``, ``ul. Długa 12``;
* designator fused to the name, number last: ``Koskikatu 25``, ``Præstevænget 15``; and a rare
  (non-dictionary) capitalised name followed by a number (``Allika 46``).

A leading building number, a trailing unit (``Apt. 864``, ``Suite 321``) and the following lines
of an address block (city, region, postcode, country: short lines without sentence punctuation)
join the street line into one span. Units and PO boxes alone are spans too.
"""

from __future__ import annotations

import re

from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from potluck.privacy import entities as E
from potluck.privacy.lexicon import STREET_ENDINGS, STREET_PREFIXES, Lexicon

_NUM = r"\d{1,6}[A-Za-z]?(?:[/-]\d{1,4}[A-Za-z]?)?"
_WORD = r"[^\W\d_][\w'’.-]*"
_UNIT = r"(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Fl\.?|Floor|Room|Rm\.?|Bldg\.?|Building|#)\s?\d{1,5}[A-Za-z]?\b"
_UNIT_RE = re.compile(rf"(?i)\b{_UNIT}|#\d{{1,5}}\b")
_PO_BOX = re.compile(r"(?i)\bP\.?\s?O\.?\s?Box\s+\d{1,7}\b")
_ADDRESS_CUE = re.compile(
    r"(?i)(?:\b(?:lives?|living|resides?|residing|located|situated|moved)\s+(?:at|to|on)|\baddress(?:\s+is|:)"
    r"|\b(?:ship|deliver|send|mail)\s+(?:it\s+|them\s+)?to:?|\bit's\s+in)[ \t]+"
    r"(?P<addr>[^\n.;!?]{3,80}?)(?=[ \t]*(?:\n|[.;!?](?:\s|$)|$))"
)
_DIGIT = re.compile(r"\d")
_CUE_NEEDLES = ("live", "living", "resid", "locat", "situat", "moved", "address", "ship", "deliver", "send", "mail",
                "it's in")
_UNIT_NEEDLES = ("apt", "apartment", "suite", "ste", "unit", "flat", "fl", "floor", "room", "rm", "bldg",
                 "building", "#")
_MILITARY_NEEDLES = ("psc", "cmr", "unit", "apo", "fpo", "dpo")
# last line of an address block: "Estonia 62488", "New Zealand 34694", "AB 1234 CD" (postcode after a place)
_POSTCODE_LINE = re.compile(
    r"(?m)^[ \t>?*-]*(?:[^\W\d_][\w'’.-]*[ \t]+){0,3}?[^\W\d_][\w'’.-]*,?[ \t]+(?P<zip>\d{3,6}(?:[ -]\d{2,4})?)[ \t]*$"
)
# a bare building number alone on a line, or before "Name. Name 12": part of a street line
_LEADING_NUMBER = re.compile(
    r"(?m)^[ \t>?*-]*(?P<n>\d{1,6})[ \t]*$"
    r"|(?<![\w.,-])(?P<n2>\d{3,6})(?=[ \t]+[^\W\d_]+\.?[ \t]+[^\W\d_]+[ \t]+\d)"
)
# US military mail (USPS Publication 28, section 225)
_MILITARY = re.compile(
    r"(?i)\b(?:PSC|CMR|Unit)[ \t]+\d{3,5},?[ \t]+Box[ \t]+\d{1,5}|\b(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)[ \t]+\d{5}\b"
)
_WORDS = re.compile(r"[^\W\d_]+\.?")
_BLOCK_LINE = re.compile(r"[ \t>]*[^\n.!?;:]{1,60}")


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


class AddressRecognizer(EntityRecognizer):
    """STREET_ADDRESS spans (see module docstring for the grammar)."""

    def __init__(self, lexicon: Lexicon, rare_zipf: float = 3.0) -> None:
        self.lex = lexicon
        self.rare_zipf = rare_zipf
        words = lexicon.street_words
        suffixes = _alternation([w.title() for w in words] + [w.upper() for w in words] + list(words))
        prefixes = _alternation([w.title() for w in STREET_PREFIXES] + list(STREET_PREFIXES))
        endings = _alternation(list(STREET_ENDINGS))
        unit = rf"(?:,?\s+{_UNIT})?"
        self._number_first = re.compile(
            rf"(?<![\w.-]){_NUM}(?:[ \t]+\d{{1,5}})?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:{_WORD}[ \t]+){{0,4}}?"
            rf"(?:{suffixes})\b\.?(?:[ \t]+(?:N|S|E|W|NE|NW|SE|SW)\b)?(?:[ \t]+\d{{1,5}}[A-Za-z]?\b\.?)?{unit}"
        )
        self._prefix_first = re.compile(
            rf"(?:(?<![\w.-]){_NUM}[ \t]+)?\b(?:{prefixes})[ \t]+(?:{_WORD}[ \t]+){{0,5}}?{_WORD},?[ \t]+{_NUM}\b{unit}"
        )
        self._fused = re.compile(
            rf"(?:(?<![\w.-]){_NUM}[ \t]+)?\b(?=[^\W\d_][\w'’-]*[ \t]+\d)"
            rf"[^\W\d_][\w'’-]*?(?i:{endings})[ \t]+{_NUM}\b{unit}"
        )
        self._rare_then_number = re.compile(
            rf"(?:(?<![\w.-]){_NUM}[ \t]+)?\b(?=[^\W\d_]{{2,}}(?:[ -][^\W\d_]{{2,}}){{0,2}}[ \t]+\d)"
            rf"(?P<name>[^\W\d_]{{2,}}(?:[ -][^\W\d_]{{2,}}){{0,2}})[ \t]+{_NUM}\b{unit}"
        )
        super().__init__(supported_entities=[E.STREET_ADDRESS], name="PotluckAddresses")

    def load(self) -> None:
        """Patterns are compiled in ``__init__``."""

    def _extend_block(self, text: str, end: int) -> int:
        """Extend an address over the following address-block lines (at most four)."""
        for _ in range(4):
            nl = text.find("\n", end)
            if nl < 0 or text[end:nl].strip(" ,\t"):  # the line goes on after the street: no block
                break
            while text.startswith("\n", nl + 1) or text[nl + 1 : nl + 3] in ("\r\n", " \n"):  # blank lines
                nl = text.find("\n", nl + 1)
            m = _BLOCK_LINE.match(text, nl + 1)
            line = m.group(0) if m else ""
            at_eol = m is not None and (m.end() == len(text) or text[m.end()] == "\n")
            if (not at_eol or not line.strip() or len(line.split()) > 6
                    or not any(c.isdigit() or c.isupper() for c in line)
                    or re.search(r"[a-z]{2,}\s+[a-z]{2,}\s+[a-z]{2,}", line)):  # prose, not an address line
                break
            end = nl + 1 + len(line.rstrip())
        return end

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if _DIGIT.search(text) is None:
            return []
        out: list[RecognizerResult] = []
        regexes = [self._number_first, self._fused]
        if not STREET_PREFIXES.isdisjoint(_WORDS.findall(text.lower())):
            regexes.append(self._prefix_first)
        for regex in regexes:
            score = 0.85
            for m in regex.finditer(text):
                out.append(RecognizerResult(E.STREET_ADDRESS, m.start(), self._extend_block(text, m.end()), score))
        for m in self._rare_then_number.finditer(text):
            words = re.split(r"[ -]", m.group("name"))
            if all(w[0].isupper() and self.lex.zipf_of(w) < self.rare_zipf for w in words):
                out.append(RecognizerResult(E.STREET_ADDRESS, m.start(), self._extend_block(text, m.end()), 0.7))
        lower = text.lower()
        cue = any(n in lower for n in _CUE_NEEDLES)
        for m in _ADDRESS_CUE.finditer(text) if cue else ():
            if any(c.isdigit() for c in m.group("addr")):
                out.append(RecognizerResult(E.STREET_ADDRESS, m.start("addr"), m.end("addr"), 0.65))
        for m in _POSTCODE_LINE.finditer(text):
            out.append(RecognizerResult(E.ZIP_CODE, m.start("zip"), m.end("zip"), 0.5))
        for m in _LEADING_NUMBER.finditer(text):  # "45818" on the line before or in front of a street
            g = "n" if m.group("n") else "n2"
            out.append(RecognizerResult(E.STREET_ADDRESS, m.start(g), m.end(g), 0.4))
        for regex, needles in ((_UNIT_RE, _UNIT_NEEDLES), (_PO_BOX, ("box",)), (_MILITARY, _MILITARY_NEEDLES)):
            if not any(n in lower for n in needles):
                continue
            out.extend(RecognizerResult(E.STREET_ADDRESS, m.start(), m.end(), 0.6) for m in regex.finditer(text))
        return out
