"""Names of people, organisations and places without an NER model: name lists plus casing and context.

Rules (a model-free variant of the capitalisation features of classic NER, Collins & Singer
1999 "Unsupervised models for named entity classification", and gazetteer lookup):

1. Tokens are maximal letter runs (inner ``-``/``'`` allowed, possessive ``'s`` dropped).
2. A capitalised token is a *candidate* when it is a known given/family name, or rare in English
   (wordfreq Zipf below ``rare_zipf``); at the start of a sentence, where capitals say nothing,
   a known name must also be uncommon as a word and a rare token must be rarer still.
3. Capitalised tokens separated by single spaces (plus initials, name particles such as ``van``
   or ``ten``, and ``&``/``and``/``of`` between capitals) form a *run*. A run becomes one span
   if it holds a candidate, or if it has two or more capitalised words in mid-sentence. A run
   never ends in a function word ("Musicians Of The"); a leading title or greeting ("Dr.",
   "Hi") stays outside and makes the rest a person's. ALL-CAPS frequent words ("PRESS NEXT")
   are emphasis, not capitals; weekdays and field names ("IBAN", "SSN") are no candidates.
   A single capitalised common word right after an organisation cue ("later became Adaptive",
   "work for NATO") is a span too.
4. The type comes from context and lists: a title or "my name is" before it, or a known given
   name in it, says PERSON; a legal form or organisation word at its end, or a "``X, Y and Z``"
   shape of family names, says ORGANIZATION; all tokens being place names says LOCATION;
   otherwise NAME.
5. Lower-case "given family" pairs (``patricia desrosiers``, ``leo kauppinen``) count when both
   are listed and neither is a frequent word; a lower-case word after an abbreviated title
   (``ms. green``) is a name; in a text without any capital letter, known names that are not
   common words and very rare words take the place of capitalised tokens.

Hyphenated compounds are as frequent as their rarest part and names when every part is one.
Speed: every token scan is gated by a set lookup on the text's lower-cased words, and the
tokenizer has an ASCII fast path (see :meth:`ProperNounRecognizer._tokens`).
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple

from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

from potluck.privacy import entities as E
from potluck.privacy.lexicon import Lexicon

_TOKEN = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*\.?")
# the same on ASCII text, where [^\W\d_] is [A-Za-z] (about twice as fast as the Unicode class)
_TOKEN_ASCII = re.compile(r"[A-Za-z]+(?:[-'][A-Za-z]+)*\.?")
_LAST_RUN_REVERSED = re.compile(r"[^\w.]*([\w.]+)")  # the last [\w.]+ run of a reversed string
_SENTENCE_BREAK = set('.!?:;\n"“”(>*•–—|[')
_TITLES = frozenset("mr mr. mrs mrs. ms ms. miss dr dr. prof prof. sir madam dame lord lady mx mx. herr frau".split())
# lower-case "given family" pairs: a listed given name and a listed family name, neither frequent
# nor a stop word, e.g. "leo kauppinen" (rarer words need no list: see _lowercase_names)
_PAIR_GIVEN_ZIPF = 5.5
_PAIR_FAMILY_ZIPF = 5.0
# abbreviated titles that are no English words ("ms" alone is also milliseconds, "dr" also drive)
_NAME_TITLES = frozenset({"mr", "mr.", "mrs", "mrs.", "ms.", "dr.", "prof.", "mx."})
_FUNCTION_WORDS = frozenset("and or the of a an to in on at for with from by is was are and & nor but".split())
# a weekday alone is a date, even where a name list has it ("Sunday" is also a given name)
_WEEKDAYS = frozenset(
    d + s for d in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday") for s in ("", "s")
)
# ... and the names of the very fields people write next to their data ("my IBAN is", "SSN:")
_FIELD_ACRONYMS = frozenset(
    "iban bic swift ssn pin cvv cvc dob vat tin ein itin zip url uri api ip mac imei otp".split()
)
_NOT_NAMES = _WEEKDAYS | _FIELD_ACRONYMS
_GREETINGS = frozenset("hi hello hey dear thanks thank cheers greetings welcome".split())  # "Hi Freddy": the name
_TITLE_ENDS = tuple(_TITLES)  # the last run before a name must end with a title for _title_before
_ORG_CUE_WORDS = ("at", "for", "joined", "became", "support", "from")
_ORG_CUE_BOUNDARY = re.compile(r"(?:^|\W)(?:at|for|joined|became|support|from)$")
_FUNCTION_CAPS = frozenset("The A An By To In On At For With From Of And Or".split())
_PARTICLES = frozenset("van von der den de da del della di du la le ten ter bin al el dos das".split())
_CONNECTORS = frozenset({"&", "and", "of", "And", "Of", "for", "the"})
_PERSON_CUES = re.compile(
    r"(?i)(?:\bname\s+is|\bnamed|\bcalled|\bi\s+am|\bi'm|\bdear|\bhi|\bhello|\bthanks|\bsincerely|"
    r"\bregards|\bassistant\s+to|\bby|\bwith|\bmeet|\bask|\bsaid|\btold|\bcontact|\blast\s+name\??|"
    r"\bfirst\s+name\??|\bfull\s+name\??|\buser:|\bpatient:?)\s*$"
)
_ORG_CUES = re.compile(
    r"(?i)(?:\bwork(?:s|ed|ing)?\s+(?:at|for)|\bemployed\s+by|\bjoined|\bcompany|\bemployer|"
    r"\bfirm|\bat)\s*$"
)
# the words each cue pattern ends with: a cheap necessary condition checked before the pattern
_PERSON_CUE_ENDS = tuple(
    "is named called am i'm dear hi hello thanks sincerely regards to by with meet ask said told contact "
    "name name? user: patient patient:".split()
)
_ORG_CUE_ENDS = ("at", "for", "by", "joined", "company", "employer", "firm")
_FIRM = re.compile(r"\b([A-Z][^\W\d_]+(?:-[A-Z][^\W\d_]+)?), ([A-Z][^\W\d_]+),? (?:and|&) ([A-Z][^\W\d_]+)\b")


_NAME_CUE = re.compile(
    r"(?i)\b(?:my\s+name\s+is|name\s*:|call\s+me|(?:last|first|full|sur)\s*name\s*(?:is|\?|:))\s*"
    r"([^\W\d_][\w'’-]*(?: [^\W\d_][\w'’-]*)?)"
)
_PRONOUN_I = frozenset(f"I{a}{b}" for a in "'’" for b in ("m", "ll", "ve", "d")) | {"I"}  # I, I'm, I’ll ...
_FIRM_LOWER = re.compile(r"\b([^\W\d_]+(?:-[^\W\d_]+)?), ([^\W\d_]+),? (?:and|&) ([^\W\d_]+)\b")


class _Tok(NamedTuple):
    start: int
    end: int
    word: str


class ProperNounRecognizer(EntityRecognizer):
    """PERSON / ORGANIZATION / LOCATION / NAME spans from casing, name lists and context.

    Args:
        lexicon: word lists (:meth:`Lexicon.load`).
        rare_zipf: a capitalised token rarer than this in English (Zipf scale) is a candidate.
    """

    def __init__(self, lexicon: Lexicon, rare_zipf: float = 3.6) -> None:
        self.lex = lexicon
        self.rare_zipf = rare_zipf
        self._given_lower = frozenset(w.lower() for w in lexicon.given_names)
        self._family_lower = frozenset(w.lower() for w in lexicon.family_names)
        self._pair_given_lower = frozenset(w for w in self._given_lower if lexicon.zipf_of(w) < _PAIR_GIVEN_ZIPF)
        super().__init__(supported_entities=[E.PERSON, E.ORGANIZATION, E.LOCATION, E.NAME], name="PotluckProperNouns")

    def load(self) -> None:
        """Word lists come with the lexicon."""

    # --- token features ---------------------------------------------------------------------------

    @staticmethod
    def _tokens(text: str) -> list[_Tok]:
        """Letter runs (inner ``-``/``'`` allowed) without a possessive ``'s``; a trailing dot is kept
        only after an initial or a title (``J.``, ``Dr.``). Offsets come from ``str.find`` over the
        matched words in order (a token starts with a letter and only non-letters lie between
        tokens, so the next occurrence is the token), cheaper than a match object per token."""
        out = []
        pos = 0
        find = text.find
        new = tuple.__new__  # _Tok(...) without NamedTuple's Python-level __new__ (half the cost)
        for word in (_TOKEN_ASCII if text.isascii() else _TOKEN).findall(text):
            start = find(word, pos)
            pos = end = start + len(word)
            last = word[-1]
            if last == "." and len(word) != 2 and word.lower() not in _TITLES:
                word, end = word[:-1], end - 1
                last = word[-1]
            if last == "s" and word[-2:] in ("'s", "’s"):
                word, end = word[:-2], end - 2
            out.append(new(_Tok, (start, end, word)))
        return out

    @staticmethod
    def _sentence_initial(text: str, start: int) -> bool:
        i = start - 1
        while i >= 0 and text[i] in " \t":
            i -= 1
        if i < 0:
            return True
        if text[i] == ".":  # "Ms. Jones", "J. Smith": a title or an initial is no sentence end
            j = i
            while j > 0 and text[j - 1].isalpha():
                j -= 1
            return not (i - j == 1 or text[j:i].lower() + "." in _TITLES)
        return text[i] in _SENTENCE_BREAK

    def _capitalised(self, word: str, lower_mode: bool = False) -> bool:
        if lower_mode:
            return self._lower_candidate(word)
        if not word[0].isupper():
            return False
        if len(word) == 1 or not word[1:].isupper():
            return True
        # ALL CAPS: emphasis or an acronym, not a name signal, unless the word is a name or uncommon
        # ("DON'T KNOW WHAT", "PRESS NEXT", "Users WHERE" are no entities; "SMITH", "NATO" may be)
        return len(word) >= 4 and not (
            (word.lower() in self.lex.common_words or self.lex.zipf_of(word) >= 4.5) and not self._is_name(word)
        )

    def _lower_candidate(self, word: str) -> bool:
        """In an all-lower-case text: a known name that is not a common word, or a very rare word."""
        if word in self.lex.common_words or len(word) < 3:
            return False
        z = self.lex.zipf_of(word)
        known = (
            word in self._given_lower
            or word in self._family_lower
            or ("-" in word and all(p in self._given_lower or p in self._family_lower for p in word.split("-")))
        )  # "garcia-smith"
        return (known and z < 4.8) or (z < 2.0 and len(word) >= 4)

    def _is_name(self, word: str) -> bool:
        w = word.title() if word.isupper() else word
        if self.lex.is_name(w):
            return True
        parts = w.split("-")  # "Jean-Luc", "Weber-Santana": every part a listed name
        return len(parts) > 1 and all(p and self.lex.is_name(p) for p in parts)

    def _candidate(self, text: str, tok: _Tok, lower_mode: bool = False) -> bool:
        word = tok.word.rstrip(".")
        if lower_mode:
            return self._lower_candidate(word)
        lw = word.lower()
        if len(word) < 2 or lw in _TITLES or lw in self.lex.common_words or lw in _NOT_NAMES:
            return False
        z = self.lex.zipf_of(word)
        if self._sentence_initial(text, tok.start):
            return (self._is_name(word) and z < 5.5) or z < 2.5
        return self._is_name(word) or z < self.rare_zipf

    # --- runs -------------------------------------------------------------------------------------

    def _runs(self, text: str, toks: list[_Tok], lower_mode: bool) -> list[list[_Tok]]:
        """Groups of capitalised tokens joined by single spaces (plus particles, initials, connectors)."""
        runs: list[list[_Tok]] = []
        cur: list[_Tok] = []
        capitalised = self._capitalised
        org_words = self.lex.org_words
        for i, tok in enumerate(toks):
            word = tok.word
            if not cur:  # only a capitalised token starts a run
                if (lower_mode or word[0].isupper()) and capitalised(word, lower_mode) and word not in _PRONOUN_I:
                    cur = [tok]
                continue
            joinable = text[cur[-1].end : tok.start] in (" ", " & ")
            if joinable and word.lower() in org_words and not (word.islower() and word in self.lex.common_words):
                cur.append(tok)  # "Acme Inc", "Solna AB"; but "Denmark as a child"
            elif capitalised(word, lower_mode) and word not in _PRONOUN_I:
                if joinable:
                    cur.append(tok)
                else:
                    runs.append(cur)
                    cur = [tok]
            elif (
                joinable
                and (word in _PARTICLES or word in _CONNECTORS)
                and i + 1 < len(toks)
                and capitalised(toks[i + 1].word, lower_mode)
                and text[tok.end : toks[i + 1].start] == " "
            ):
                cur.append(tok)
            else:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        return runs

    def _span_of_run(self, text: str, run: list[_Tok], lower_mode: bool) -> tuple[list[_Tok], bool] | None:
        """The entity part of a run and whether a title preceded it, or ``None``.

        Two or more capitalised tokens form an entity even at a sentence start (all but the first
        carry information); a single token must be a candidate or follow a title.
        """
        titled = False
        while run and (
            run[0].word.lower() in _TITLES
            or run[0].word in _CONNECTORS
            or (len(run) > 1 and run[0].word.lower() in _GREETINGS)
        ):
            titled = titled or run[0].word.lower() in _TITLES or run[0].word.lower() in _GREETINGS
            run = run[1:]  # a title or greeting before a name makes it a person's
        while (
            run
            and not lower_mode
            and len(run) > 1
            and self._sentence_initial(text, run[0].start)
            and run[0].word.lower() in self.lex.common_words
        ):
            run = run[1:]
        while run and (run[-1].word in _CONNECTORS or run[-1].word in _PARTICLES or run[-1].word in _FUNCTION_CAPS):
            run = run[:-1]  # "Musicians Of The", "Directed By": a name does not end in a function word
        if not run:
            return None
        if titled or len(run) >= 2 or self._candidate(text, run[0], lower_mode):
            return run, titled
        if not lower_mode and self._after_org_cue(text, run[0]):
            return run, titled
        return None

    def _after_org_cue(self, text: str, tok: _Tok) -> bool:
        """A capitalised common word in mid-sentence right after "works at", "joined", "became"...
        ("later became Adaptive", "work for NATO"): the capital marks a name the lists cannot know."""
        word = tok.word
        if len(word) < 3 or word.lower() in _NOT_NAMES or word in _PRONOUN_I or self._sentence_initial(text, tok.start):
            return False
        before = text[max(0, tok.start - 12) : tok.start].rstrip()  # the cue in lower case: prose, not "FROM"
        return before.endswith(_ORG_CUE_WORDS) and _ORG_CUE_BOUNDARY.search(before) is not None

    @staticmethod
    def _title_before(before: str) -> bool:
        """Whether the last ``[\\w.]+`` run of ``before`` is a title (``Dr.``, ``mrs``)."""
        m = _LAST_RUN_REVERSED.match(before[::-1])
        return m is not None and m.group(1)[::-1].lower() in _TITLES

    def _type_of(self, text: str, run: list[_Tok], titled: bool) -> str:
        before = text[max(0, run[0].start - 40) : run[0].start]
        words = [t.word.rstrip(".") for t in run]
        words = [w.title() if w.islower() else w for w in words]
        if words[-1].lower() in self.lex.org_words or any(w in ("&", "And") for w in words):
            return E.ORGANIZATION
        tail = before.rstrip().lower()
        if (
            titled
            or (tail.endswith(_TITLE_ENDS) and self._title_before(before))
            or (tail.endswith(_PERSON_CUE_ENDS) and _PERSON_CUES.search(before))
        ):
            return E.PERSON
        if any(w in self.lex.given_names for w in words) or (len(words) >= 2 and words[-1] in self.lex.family_names):
            return E.PERSON
        if all(w in self.lex.places for w in words):
            return E.LOCATION
        if tail.endswith(_ORG_CUE_ENDS) and _ORG_CUES.search(before):
            return E.ORGANIZATION
        if len(words) == 1 and words[0] in self.lex.family_names:
            return E.PERSON
        return E.NAME

    def _before_org_words(self, text: str, toks: list[_Tok]) -> list[RecognizerResult]:
        """ "<words> Inc." / "<Words> Agency": the words before an organisation word, in any case."""
        out = []
        for i, tok in enumerate(toks):
            if i == 0 or tok.word.lower().rstrip(".") not in self.lex.org_words:
                continue
            if tok.word.islower() and tok.word.rstrip(".") in self.lex.common_words:  # "as", "co", "se"
                continue
            j = i
            while j > 0 and i - j < 4 and text[toks[j - 1].end : toks[j].start] == " ":
                prev = toks[j - 1].word
                if (
                    prev.lower() in _TITLES
                    or prev in _CONNECTORS
                    or not (prev[0].isupper() or prev.lower() not in self.lex.common_words)
                ):
                    break
                j -= 1
            if j < i:
                dotted = text[tok.end : tok.end + 1] == "." and tok.word.lower() in ("inc", "ltd", "co", "corp")
                end = tok.end + dotted
                out.append(RecognizerResult(E.ORGANIZATION, toks[j].start, end, 0.55))
        return out

    def _firm_names(self, words: tuple[str, ...]) -> bool:
        """ "Clark, Romero and Hall": partners' names make a firm; two of the three must be listed
        family names or rare words (Zipf < 2.5; "Comedy, Kids & Family" and "antelope, camels, and
        more" are lists)."""
        hits = 0
        for word in words:
            w = word.title() if word.islower() or word.isupper() else word
            hits += w in self.lex.family_names or self.lex.zipf_of(word) < 2.5
        return hits >= 2

    def _after_lowercase_title(self, text: str, toks: list[_Tok]) -> list[RecognizerResult]:
        """``mr. smith``, ``dr. green``: a lower-case word after an abbreviated title is a name,
        whatever its frequency (capitalised ones are handled by the runs)."""
        out = []
        for i, tok in enumerate(toks[:-1]):
            if tok.word.lower() not in _NAME_TITLES:
                continue
            nxt = toks[i + 1]
            if (
                nxt.word.islower()
                and nxt.word not in _FUNCTION_WORDS
                and len(nxt.word) >= 2
                and text[tok.end : nxt.start] == " "
            ):
                end = nxt.end
                if (
                    i + 2 < len(toks)
                    and text[nxt.end : toks[i + 2].start] == " "
                    and toks[i + 2].word.islower()
                    and toks[i + 2].word in self._family_lower
                    and toks[i + 2].word not in _FUNCTION_WORDS
                ):
                    end = toks[i + 2].end  # "dr. anna berg"
                out.append(RecognizerResult(E.PERSON, nxt.start, end, 0.55))
        return out

    def _lowercase_names(self, text: str, toks: list[_Tok]) -> list[RecognizerResult]:
        out = []
        given = self._pair_given_lower  # given names with Zipf < _PAIR_GIVEN_ZIPF, lower case
        for a, b in itertools.pairwise(toks):
            if a.word not in given:
                continue
            if not (a.word.islower() and b.word.islower()) or text[a.end : b.start] != " ":
                continue
            za, zb = self.lex.zipf_of(a.word), self.lex.zipf_of(b.word)
            if za < 4.0 and (b.word in self._family_lower or zb < 2.5) and zb < 3.5:
                out.append(RecognizerResult(E.PERSON, a.start, b.end, 0.5))
            elif (
                zb < _PAIR_FAMILY_ZIPF
                and b.word in self._family_lower
                and a.word not in self.lex.common_words
                and b.word not in self.lex.common_words
            ):
                out.append(RecognizerResult(E.PERSON, a.start, b.end, 0.45))  # "leo kauppinen", "john smith"
        return out

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        toks = self._tokens(text)
        lower_mode = bool(toks) and not any(map(str.isupper, text))
        out: list[RecognizerResult] = []
        for run in self._runs(text, toks, lower_mode):
            found = self._span_of_run(text, run, lower_mode)
            if found:
                span, titled = found
                etype = self._type_of(text, span, titled)
                out.append(RecognizerResult(etype, span[0].start, span[-1].end, 0.6))
        if ", " in text and (" and " in text or " & " in text):  # both are literal parts of the pattern
            firm = _FIRM_LOWER if lower_mode else _FIRM
            out.extend(
                RecognizerResult(E.ORGANIZATION, m.start(), m.end(), 0.7)
                for m in firm.finditer(text)
                if self._firm_names(m.groups())
            )
        # the three token scans below run only if a word they look for occurs at all
        seen = {t.word.lower() for t in toks}
        seen.update([w[:-1] for w in seen if w[-1] == "."])
        if not self._pair_given_lower.isdisjoint(seen):
            out.extend(self._lowercase_names(text, toks))
        if not _NAME_TITLES.isdisjoint(seen):
            out.extend(self._after_lowercase_title(text, toks))
        if not self.lex.org_words.isdisjoint(seen):
            out.extend(self._before_org_words(text, toks))
        lower = text.lower()
        for m in _NAME_CUE.finditer(text) if "name" in lower or "call" in lower else ():
            words = m.group(1).split()
            while words and (words[-1].lower() in self.lex.common_words or self.lex.zipf_of(words[-1]) >= 4.0):
                words.pop()
            if words:
                end = m.start(1) + len(" ".join(words))
                if text[m.start(1) : end] == " ".join(words):
                    out.append(RecognizerResult(E.PERSON, m.start(1), end, 0.7))
        return out
