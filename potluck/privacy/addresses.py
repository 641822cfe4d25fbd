"""Street addresses from a small address grammar (no model).

Street lines, in the three shapes postal conventions use (UPU S42 international address
templates):

* number first, designator last: ``1600 Pennsylvania Avenue NW``, ``14 Crown Street``;
* designator first, number last: ``Rua do Arenque 1634``, ``Via Roma 5``, ``ul. Długa 12``;
* designator fused to the name, number last: ``Koskikatu 25``, ``Præstevænget 15``; and a rare
  (non-dictionary) capitalised name followed by a number (``Allika 46``).

A leading building number, a trailing unit (``Apt. 864``, ``Suite 321``) and the following lines
of an address block (city, region, postcode, country: short lines without sentence punctuation)
join the street line into one span. Units and PO boxes alone are spans too; postcodes after a
"ZIP:"/"postcode" cue, after a place name or at the end of an address block are ZIP_CODE spans.

Designators come from Faker's street suffixes (all locales): capitalised ones follow the name,
lower-case ones are fused to it. A designator that is also a frequent English word ("Rise",
"View") counts only when capitalised.

Speed: every pattern runs only behind a cheap necessary condition computed once per text (the
lower-cased word set, the words right before numbers), and the analyzer skips this recognizer
for texts without digits.
"""

from __future__ import annotations

import re

from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from potluck.privacy import entities as E
from potluck.privacy.lexicon import STREET_PREFIXES, STREET_WORDS, Lexicon

_NUM = r"\d{1,6}[A-Za-z]?(?:[/-]\d{1,4}[A-Za-z]?)?"
_WORD = r"[^\W\d_][\w'’.-]*"
# unit designators (Faker's secondary-address formats: en_US/GB/AU, es, it)
_UNIT = (
    r"(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Fl\.?|Floor|Room|Rm\.?|Bldg\.?|Building|Studio|Apto\.?|"
    r"Apartamento|Appartamento|Dpto\.?|Depto\.?|Dto\.?|Piso|Puerta|Oficina|#)\s?\d{1,5}[A-Za-z]?\b"
)
_UNIT_RE = re.compile(rf"(?i)\b{_UNIT}")
_PO_BOX = re.compile(r"(?i)\bP\.?\s?O\.?\s?Box\s+\d{1,7}\b")
_ADDRESS_CUE = re.compile(
    r"(?i)(?:\b(?:lives?|living|resides?|residing|located|situated|moved)\s+(?:at|to|on)|\baddress(?:\s+is|:)"
    r"|\b(?:ship|deliver|send|mail)\s+(?:it\s+|them\s+)?to:?|\bit's\s+in)[ \t]+"
    r"(?P<addr>[^\n.;!?]{3,80}?)(?=[ \t]*(?:\n|[.;!?](?:\s|$)|$))"
)
_DIGIT = re.compile(r"\d")
_CUE_NEEDLES = (
    "live",
    "living",
    "resid",
    "locat",
    "situat",
    "moved",
    "address",
    "ship",
    "deliver",
    "send",
    "mail",
    "it's in",
)
# last line of an address block: "Estonia 62488", "New Zealand 34694", "AB 1234 CD" (postcode after a place)
_POSTCODE_LINE = re.compile(
    r"(?m)^[ \t>?*-]*(?:[^\W\d_][\w'’.-]*[ \t]+){0,3}?[^\W\d_][\w'’.-]*,?[ \t]+(?P<zip>\d{3,6}(?:[ -]\d{2,4})?)[ \t]*$"
)
# a bare building number alone on a line, or before "Name. Name 12": part of a street line
_NUMBER_LINE = re.compile(r"(?m)^[ \t>?*-]*(?P<n>\d{1,6})[ \t]*$")
_NUMBER_BEFORE_STREET = re.compile(  # digit first (a fast scan), then the look-behind on the char before it
    r"\d(?<![\w.,-]\d)\d{2,5}(?=[ \t]+(?P<w1>[^\W\d_]+)\.?[ \t]+(?P<w2>[^\W\d_]+)[ \t]+\d)"
)
# US military mail (USPS Publication 28, section 225)
_MILITARY = re.compile(
    r"(?i)\b(?:PSC|CMR|Unit)[ \t]+\d{3,5},?[ \t]+Box[ \t]+\d{1,5}|\b(?:APO|FPO|DPO)[ \t]+(?:AA|AE|AP)[ \t]+\d{5}\b"
)
_WORDS = re.compile(r"[^\W\d_]+\.?")
_WORDS_ASCII = re.compile(r"[A-Za-z]+\.?")  # the same on ASCII text (twice as fast)
_SPACE_DIGIT = re.compile(r"[ \t]\d")
_ZIP_AT = re.compile(r"\d{3,6}(?:[ -]\d{2,3})?(?![\w-])")
# "ZIP: 3520", "postal code 394 13", "Postcode: 7412 SL", "PLZ 10115" (the value holds a digit)
_ZIP_CUE = re.compile(
    r"\b(?i:zip(?:\s*code)?|post(?:al)?\s*code|postcode|plz)\s*[:#]?\s*"
    r"(?P<zip>(?=[A-Za-z0-9]{0,5}\d)[A-Za-z0-9]{2,6}(?:[ -](?:\d{2,4}|[A-Z]{2})(?![\w-]))?)(?![\w-])"
)
_LINE_ENDS_IN_DIGIT = re.compile(r"\d[ \t]*$", re.M)
_BLOCK_LINE = re.compile(r"[ \t>]*[^\n.!?;:]{1,60}")


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _heads(word: str) -> tuple[str, ...]:
    """The first letter run of ``word``, as a text's word set may hold it (with or without a dot)."""
    m = _WORDS.match(word)
    if m is None:
        return ()
    run = m.group(0).rstrip(".")
    return run, run + "."


def _with_dots(words: frozenset[str]) -> frozenset[str]:
    return words | {w + "." for w in words}


_UNIT_WORDS = _with_dots(
    frozenset(
        "apt apartment suite ste unit flat fl floor room rm bldg building studio apto apartamento appartamento "
        "dpto depto "
        "dto piso puerta oficina".split()
    )
)
_MILITARY_WORDS = _with_dots(frozenset(("psc", "cmr", "unit", "apo", "fpo", "dpo")))


class AddressRecognizer(EntityRecognizer):
    """STREET_ADDRESS spans (see module docstring for the grammar)."""

    needs_digit = True  # every pattern holds a number: the analyzer skips texts without digits

    def __init__(self, lexicon: Lexicon, rare_zipf: float = 3.0) -> None:
        self.lex = lexicon
        self.rare_zipf = rare_zipf
        words = lexicon.street_words
        # A designator that is also a frequent English word ("Rise", "View", "Mission" in Faker's
        # en_GB/en_AU lists) counts only when capitalised: in lower case it is the word
        # ("10 transaction of", "in its mission"). Function words ("of") never count.
        weak = {w for w in words - STREET_WORDS if w in lexicon.common_words or lexicon.zipf_of(w) >= 4.5}
        words = frozenset(w for w in words if lexicon.zipf_of(w) < 6.0 or w in STREET_WORDS)
        suffixes = _alternation(
            [w.title() for w in words] + [w.upper() for w in words] + [w for w in words if w not in weak]
        )
        prefixes = _alternation([w.title() for w in STREET_PREFIXES] + list(STREET_PREFIXES))
        endings = _alternation(list(lexicon.street_endings))
        self._endings = tuple(e.lower() for e in lexicon.street_endings)
        unit = rf"(?:,?\s+{_UNIT})?"
        self._number_first = re.compile(  # digit first: the look-behind is checked after one digit
            rf"\d(?<![\w.-]\d)\d{{0,5}}[A-Za-z]?(?:[/-]\d{{1,4}}[A-Za-z]?)?"  # _NUM, digit first
            rf"(?:[ \t]+\d{{1,5}})?[ \t]+(?:[NSEW]\.?[ \t]+)?(?:{_WORD}[ \t]+){{0,4}}?"
            rf"(?:{suffixes})\b\.?(?:[ \t]+(?:N|S|E|W|NE|NW|SE|SW)\b)?(?:[ \t]+\d{{1,5}}[A-Za-z]?\b\.?)?{unit}"
        )
        self._prefix_first = re.compile(
            rf"(?:(?<![\w.-]){_NUM}[ \t]+)?\b(?:{prefixes})[ \t]+(?:{_WORD}[ \t]+){{0,5}}?{_WORD},?[ \t]+{_NUM}\b{unit}"
        )
        self._fused = re.compile(
            rf"(?:(?<![\w.-]){_NUM}[ \t]+)?\b(?=[^\W\d_][\w'’-]*[ \t]+\d)"
            rf"(?P<fw>[^\W\d_][\w'’-]*?(?i:{endings}))[ \t]+{_NUM}\b{unit}"
        )
        self._rare_then_number = re.compile(
            rf"(?:(?<![\w.-]){_NUM}[ \t]+)?\b(?=[^\W\d_]{{2,}}(?:[ -][^\W\d_]{{2,}}){{0,2}}[ \t]+\d)"
            rf"(?P<name>[^\W\d_]{{2,}}(?:[ -][^\W\d_]{{2,}}){{0,2}})[ \t]+{_NUM}\b{unit}"
        )
        # gates: the first letter run of every designator, as the lower-cased word set of a text holds it
        self._street_heads = frozenset(h for w in words - weak for form in (w, w.upper().lower()) for h in _heads(form))
        self._weak_heads = frozenset(h for w in words & weak for h in _heads(w))  # must appear capitalised
        self._prefix_heads = frozenset(h for w in STREET_PREFIXES for h in _heads(w))
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
            if (
                not at_eol
                or not line.strip()
                or len(line.split()) > 6
                or not any(c.isdigit() or c.isupper() for c in line)
                or re.search(r"[a-z]{2,}\s+[a-z]{2,}\s+[a-z]{2,}", line)
            ):  # prose, not an address line
                break
            end = nl + 1 + len(line.rstrip())
        return end

    @staticmethod
    def _words_before_numbers(text: str) -> list[tuple[str, int]]:
        """For every number preceded by blanks: the ``[\\w'’.-]`` run right before the blanks, and
        where the number starts."""
        out = []
        for m in _SPACE_DIGIT.finditer(text):
            end = m.start()
            while end > 0 and text[end - 1] in " \t":
                end -= 1
            start = end
            while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_'’.-"):
                start -= 1
            out.append((text[start:end], m.start() + 1))
        return out

    def _fused_name(self, word: str) -> bool:
        """A street name with a fused designator ("Koskikatu") is no frequent English word that
        merely ends like one ("During", "Spring", "Offering")."""
        return word.lower() not in self.lex.common_words and self.lex.zipf_of(word) < 4.0

    def _rare_street_word(self, word: str, lower_text: bool) -> bool:
        """A word of a street name before a number: capitalised and rarer than ``rare_zipf``, or in
        an all-lower-case text, very rare (Zipf below ``rare_zipf - 1``)."""
        if word[0].isupper():
            return self.lex.zipf_of(word) < self.rare_zipf
        return lower_text and self.lex.zipf_of(word) < self.rare_zipf - 1.0

    def _rare_word_before_number(self, runs: list[tuple[str, int]], lower_text: bool) -> bool:
        """Necessary condition for ``_rare_then_number`` to yield a span: some number preceded by
        blanks and a letter run that passes :meth:`_rare_street_word` (the last word of the name)."""
        for run, _ in runs:
            start = len(run)
            while start > 0 and run[start - 1].isalnum() and not run[start - 1].isdecimal():  # [^\W\d_]
                start -= 1
            word = run[start:]
            if len(word) >= 2 and self._rare_street_word(word, lower_text):
                return True
        return False

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if _DIGIT.search(text) is None:
            return []
        out: list[RecognizerResult] = []
        lower = text.lower()
        words = set((_WORDS_ASCII if text.isascii() else _WORDS).findall(lower))  # letter runs (+ a dot)
        before_numbers = self._words_before_numbers(text)
        # every gate below is a necessary condition of its pattern (a speed-up, never a filter)
        regexes = []
        if not self._street_heads.isdisjoint(words) or any(
            h.title() in text or h.upper() in text for h in self._weak_heads & words
        ):
            regexes.append(self._number_first)
        if any(w.lower().endswith(self._endings) for w, _ in before_numbers):
            regexes.append(self._fused)
        if not self._prefix_heads.isdisjoint(words):
            regexes.append(self._prefix_first)
        for regex in regexes:
            for m in regex.finditer(text):
                if regex is self._fused and not self._fused_name(m.group("fw")):
                    continue
                out.append(RecognizerResult(E.STREET_ADDRESS, m.start(), self._extend_block(text, m.end()), 0.85))
        lower_text = not any(map(str.isupper, text))
        if self._rare_word_before_number(before_numbers, lower_text):
            for m in self._rare_then_number.finditer(text):
                parts = re.split(r"[ -]", m.group("name"))
                if all(self._rare_street_word(w, lower_text) for w in parts):
                    out.append(RecognizerResult(E.STREET_ADDRESS, m.start(), self._extend_block(text, m.end()), 0.7))
        if any(n in lower for n in _CUE_NEEDLES):
            for m in _ADDRESS_CUE.finditer(text):
                if any(c.isdigit() for c in m.group("addr")):
                    out.append(RecognizerResult(E.STREET_ADDRESS, m.start("addr"), m.end("addr"), 0.65))
        for word, at in before_numbers:  # "Sydney 2000", "Tunisia 6091": a postcode after a place name
            if word[:1].isupper() and word in self.lex.places and (z := _ZIP_AT.match(text, at)) is not None:
                out.append(RecognizerResult(E.ZIP_CODE, z.start(), z.end(), 0.45))
        if "zip" in lower or "post" in lower or "plz" in lower:
            for m in _ZIP_CUE.finditer(text):
                out.append(RecognizerResult(E.ZIP_CODE, m.start("zip"), m.end("zip"), 0.6))
        if _LINE_ENDS_IN_DIGIT.search(text):
            for m in _POSTCODE_LINE.finditer(text):
                out.append(RecognizerResult(E.ZIP_CODE, m.start("zip"), m.end("zip"), 0.5))
            for m in _NUMBER_LINE.finditer(text):  # "45818" alone on the line before a street
                out.append(RecognizerResult(E.STREET_ADDRESS, m.start("n"), m.end("n"), 0.4))
        for m in _NUMBER_BEFORE_STREET.finditer(text):  # "85199 Name. Name 58" (not "2019 we sold 250")
            w1, w2 = m.group("w1"), m.group("w2")
            if (w1[0].isupper() and w2[0].isupper()) or (
                lower_text and self.lex.zipf_of(w1) < 4.0 and self.lex.zipf_of(w2) < 4.0
            ):
                out.append(RecognizerResult(E.STREET_ADDRESS, m.start(), m.end(), 0.4))
        for regex, hit in (
            (_UNIT_RE, not _UNIT_WORDS.isdisjoint(words) or "#" in text),
            (_PO_BOX, "box" in lower),
            (_MILITARY, not _MILITARY_WORDS.isdisjoint(words)),
        ):
            if hit:
                out.extend(RecognizerResult(E.STREET_ADDRESS, m.start(), m.end(), 0.6) for m in regex.finditer(text))
        return out
