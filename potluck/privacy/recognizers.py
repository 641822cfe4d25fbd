"""Our own presidio recognizers: secrets and keys, phone numbers, passports, ID numbers after a cue,
crypto, card/IBAN shapes.

Every recognizer here is a presidio :class:`~presidio_analyzer.EntityRecognizer` (patterns plus
a validation check, as presidio declares them) so it runs inside the same ``AnalyzerEngine`` as
presidio's own checksum recognizers. They need no NLP artifacts.

Provider token formats follow the providers' published prefixes (GitHub "About authentication
to GitHub" token prefixes, Stripe API keys docs, Slack token types, AWS IAM identifiers, Google
API keys, OpenAI/Anthropic/Hugging Face key prefixes) and the gitleaks default rule set.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import phonenumbers
import tldextract
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from presidio_analyzer.predefined_recognizers import EmailRecognizer
from stdnum import luhn, numdb
from stdnum.iso7064 import mod_97_10

from potluck.privacy import entities as E

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    """One regex rule: ``group`` selects the sensitive part (0 = whole match)."""

    regex: re.Pattern[str]
    entity: str
    score: float = 0.9
    group: int | str = 0
    validate: Callable[[str], bool] | None = None
    trim: Callable[[str], int] | None = None  # length of the valid prefix of a match (0: no match)
    needles: tuple[str, ...] = ()  # the rule runs only if one of these occurs in the lower-cased text
    hint: re.Pattern[str] | None = None  # ... and only if this (a necessary condition) is found in the text
    min_run: int = 0  # every match holds a whitespace-free run at least this long (a necessary condition)


_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


class RegexRecognizer(EntityRecognizer):
    """Runs precompiled :class:`Rule` s; an optional cheap ``gate`` skips texts that cannot match.

    Cheapest checks first: a rule whose matches need a longer whitespace-free run than the text's
    longest is skipped before its needles are looked up (prose has no 20-character words).
    """

    def __init__(
        self, name: str, rules: Sequence[Rule], gate: Callable[[str], bool] | None = None, needs_digit: bool = False
    ) -> None:
        self.rules = tuple(rules)
        self.gate = gate
        self.needs_digit = needs_digit  # every rule's matches hold a digit (the engine skips other texts)
        self._uses_needles = any(r.needles for r in self.rules)
        self._uses_runs = any(r.min_run for r in self.rules)
        super().__init__(supported_entities=sorted({r.entity for r in rules}), name=name)

    def load(self) -> None:
        """Nothing to load: the rules are compiled at import."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if self.gate is not None and not self.gate(text):
            return []
        out: list[RecognizerResult] = []
        lower = text.lower() if self._uses_needles else text
        longest = max(map(len, text.split()), default=0) if self._uses_runs else 0
        for rule in self.rules:
            if rule.min_run > longest:
                continue
            if rule.needles:
                for needle in rule.needles:
                    if needle in lower:
                        break
                else:
                    continue
            if rule.hint is not None and rule.hint.search(text) is None:
                continue
            for m in rule.regex.finditer(text):
                start, end = m.span(rule.group)
                if start < 0 or end <= start:
                    continue
                if rule.trim is not None:
                    end = start + rule.trim(text[start:end])
                    if end <= start:
                        continue
                if rule.validate is not None and not rule.validate(text[start:end]):
                    continue
                out.append(RecognizerResult(rule.entity, start, end, rule.score))
        return out


# --- secrets -----------------------------------------------------------------------------------

_KEY_NAMES = (
    r"pass(?:word|wd|phrase)?|pwd|secret(?:[_-]?key)?|api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?|"
    r"(?:access|auth|refresh|bearer|session|id)[_-]?token|token|client[_-]?secret|private[_-]?key|"
    r"account[_-]?key|shared[_-]?access[_-]?key|credentials?|auth"
)


# Every assignment rule's key name contains one of these stems (a necessary condition, lower case).
_KEY_STEMS = ("pass", "pwd", "secret", "key", "token", "auth", "credential")
_QUOTED_VALUE = re.compile(r"[=:>]\s*[\"']")


def _shannon_bits(s: str) -> float:
    """Shannon entropy of the characters of ``s``, in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_random(s: str) -> bool:
    classes = sum((any(c.islower() for c in s), any(c.isupper() for c in s), any(c.isdigit() for c in s)))
    return classes >= 2 and _shannon_bits(s) >= 3.3


SECRET_RULES = (
    # PEM / OpenSSH / PGP private key blocks (RFC 7468 labels)
    Rule(
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY"
            r"(?: BLOCK)?-----",
            re.S,
        ),
        E.SECRET,
        1.0,
        min_run=10,
        needles=("-----begin",),
    ),
    # JSON Web Token: base64url header "{"... . payload . signature (RFC 7519)
    Rule(
        re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{8,}"),
        E.SECRET,
        1.0,
        min_run=26,
        needles=("eyj",),
    ),
    # provider tokens with documented prefixes
    Rule(
        re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)[0-9A-Z]{16}\b"),
        E.SECRET,
        1.0,
        min_run=20,
        needles=("akia", "asia", "abia", "acca", "agpa", "aida", "aroa", "anpa", "anva", "apka"),
    ),
    Rule(
        re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,255}\b|\bgithub_pat_[A-Za-z0-9_]{22,255}"),
        E.SECRET,
        1.0,
        min_run=33,
        needles=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    ),
    Rule(re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"), E.SECRET, 1.0, min_run=26, needles=("glpat-",)),
    Rule(
        re.compile(r"\bsk-(?:ant-|proj-|svcacct-|admin-|or-v1-)?[A-Za-z0-9_-]{20,}"),
        E.SECRET,
        1.0,
        min_run=23,
        needles=("sk-",),
    ),
    Rule(
        re.compile(r"\b(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"),
        E.SECRET,
        1.0,
        min_run=24,
        needles=("_live_", "_test_"),
    ),
    Rule(re.compile(r"\bxox[abposre]-[A-Za-z0-9-]{10,}"), E.SECRET, 1.0, min_run=15, needles=("xox",)),
    Rule(
        re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}"),
        E.SECRET,
        1.0,
        min_run=53,
        needles=("hooks.slack",),
    ),
    Rule(re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), E.SECRET, 1.0, min_run=39, needles=("aiza",)),
    Rule(re.compile(r"\bya29\.[0-9A-Za-z_-]{20,}"), E.SECRET, 1.0, min_run=25, needles=("ya29.",)),
    Rule(re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), E.SECRET, 1.0, min_run=33, needles=("hf_",)),
    Rule(re.compile(r"\bnpm_[A-Za-z0-9]{36}\b"), E.SECRET, 1.0, min_run=40, needles=("npm_",)),
    Rule(re.compile(r"\bpypi-[A-Za-z0-9_-]{50,}"), E.SECRET, 1.0, min_run=55, needles=("pypi-",)),
    Rule(re.compile(r"\bSG\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"), E.SECRET, 1.0, min_run=36, needles=("sg.",)),
    Rule(re.compile(r"\b(?:SK|AC)[0-9a-fA-F]{32}\b"), E.SECRET, 0.9, min_run=34),  # Twilio
    Rule(
        re.compile(r"\b\d{8,10}:AA[A-Za-z0-9_-]{33}\b"),
        E.SECRET,
        1.0,
        min_run=44,  # Telegram bot token
        needles=(":aa",),
    ),
    Rule(
        re.compile(r"\b(?:dop|doo|dor)_v1_[a-f0-9]{64}\b"),
        E.SECRET,
        1.0,
        min_run=71,  # DigitalOcean
        needles=("_v1_",),
    ),
    # Authorization headers (RFC 6750 bearer, RFC 7617 basic)
    Rule(re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/=-]{12,})"), E.SECRET, 1.0, 1, min_run=12, needles=("bearer",)),
    Rule(re.compile(r"(?i)\bbasic\s+([A-Za-z0-9+/]{12,}={0,2})"), E.SECRET, 0.9, 1, min_run=12, needles=("basic",)),
    # user:password@ in any URL, connection strings included (RFC 3986 userinfo)
    Rule(
        re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s:/@'\"]{1,128}:([^\s@/'\"]{1,256})@"),
        E.SECRET,
        1.0,
        1,
        min_run=9,
        needles=("://",),
    ),
    # key = value / key: value assignments (config files, env, ADO connection strings, JSON)
    Rule(
        re.compile(
            rf"(?i)(?<![A-Za-z0-9])[\"']?(?:[A-Za-z0-9]+[_-])*(?:{_KEY_NAMES})[\"']?\s*(?:=|:|=>|:=)\s*"
            r"(?:\"(?P<dq>[^\"\n]{1,512})\"|'(?P<sq>[^'\n]{1,512})'|(?P<bare>[^\s'\";,]{1,512}))"
        ),
        E.SECRET,
        0.95,
        "bare",
        needles=_KEY_STEMS,
    ),
    Rule(
        re.compile(
            rf"(?i)(?<![A-Za-z0-9])[\"']?(?:[A-Za-z0-9]+[_-])*(?:{_KEY_NAMES})[\"']?\s*(?:=|:|=>|:=)\s*"
            r"\"(?P<dq>[^\"\n]{1,512})\""
        ),
        E.SECRET,
        0.95,
        "dq",
        needles=_KEY_STEMS,
        hint=_QUOTED_VALUE,
    ),
    Rule(
        re.compile(
            rf"(?i)(?<![A-Za-z0-9])[\"']?(?:[A-Za-z0-9]+[_-])*(?:{_KEY_NAMES})[\"']?\s*(?:=|:|=>|:=)\s*"
            r"'(?P<sq>[^'\n]{1,512})'"
        ),
        E.SECRET,
        0.95,
        "sq",
        needles=_KEY_STEMS,
        hint=_QUOTED_VALUE,
    ),
    # natural language: "my password is hunter2", "the pin is 1234"
    Rule(
        re.compile(
            r"(?i)\b(?:password|passphrase|passcode|pin|api key|token|secret)\s+(?:is|was|=)\s*:?\s*"
            r"[\"'“]?([^\s\"'”]{3,256}?)[\"'”]?(?=[\s.,;!?]*(?:\s|$))"
        ),
        E.SECRET,
        0.9,
        1,
        needles=("password", "passphrase", "passcode", "pin ", "api key", "token", "secret"),
    ),
    # long random-looking tokens of unknown providers (high entropy, mixed character classes)
    Rule(re.compile(r"(?<![A-Za-z0-9_/+=-])[A-Za-z0-9_+/-]{32,}={0,2}"), E.SECRET, 0.6, 0, _looks_random, min_run=32),
)

# --- crypto, MAC, passport -------------------------------------------------------------------------

OTHER_RULES = (
    # e-mail addresses whose domain is not in the public-suffix snapshot (presidio's check drops them)
    Rule(
        re.compile(r"(?<![\w.+:/-])[\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})+"),
        E.EMAIL_ADDRESS,
        0.5,
        min_run=5,
        needles=("@",),
    ),
    Rule(re.compile(r"\b0x[a-fA-F0-9]{40}\b"), E.CRYPTO, 0.9, min_run=42, needles=("0x",)),  # Ethereum address (EIP-55)
    Rule(
        re.compile(r"\b(?:bc1|tb1)[ac-hj-np-z02-9]{25,87}\b"),
        E.CRYPTO,
        0.9,
        min_run=28,  # BIP-173
        needles=("bc1", "tb1"),
    ),
    Rule(re.compile(r"\b[LM3][a-km-zA-HJ-NP-Z1-9]{26,33}\b"), E.CRYPTO, 0.5, 0, _has_digit, min_run=27),  # LTC/P2SH
    Rule(
        re.compile(
            r"(?i)\bpassport(?:\s+(?:no\.?|number|num|#|id))?\s*(?:is|:|#|was)?\s*:?\s*(?P<v>[A-Z0-9]{1,3}[ -]?"
            r"[A-Z0-9]{4,9})\b"
        ),
        E.PASSPORT,
        0.9,
        "v",
        _has_digit,
        needles=("passport",),
    ),
)

# --- ID numbers that follow an explicit cue --------------------------------------------------------

# The cue names the document ("driver's license number is", "tax ID:", "member no."); the number
# itself has no checksum or shape of its own (US licence formats alone differ per state: AAMVA DL/ID
# card design standard, annex D), so the cue is what makes it sensitive. Passports have their own
# rule above (type PASSPORT).
_ID_CUE = (
    r"(?:(?:driver'?s?|driving)\s+licen[cs]e|licen[cs]e|DL|"
    r"(?:national|tax|taxpayer|personal|member(?:ship)?|customer|patient|employee|student|voter|"
    r"social\s+(?:security|insurance)|(?:health\s+)?insurance|policy|identity\s+card|identification|ID)"
    r"(?:\s+(?:ID|identification))?)"
)
_ID_NOUN = r"(?:\s+(?:card\s+)?(?:number|num|no\.?|nr\.?|\#|ID))"
_ID_VALUE = r"(?P<v>[A-Z0-9](?:[A-Z0-9]|[-./](?=[A-Z0-9])|\s(?=\d{2,}))*)"


def _id_value_ok(value: str) -> bool:
    """At least three digits, 4-30 letters and digits: a number, not a word or a year."""
    alnum = sum(c.isalnum() for c in value)
    return sum(c.isdigit() for c in value) >= 3 and 4 <= alnum <= 30


ID_RULES = (
    # "driver's license: S530-4127-8365", "license number is D123-4567", "tax ID 12-3456789",
    # "national ID number: 123 456 789", "member no. A1234567" (a bare "licence"/"ID" needs its noun)
    Rule(
        re.compile(
            rf"(?i)\b(?:(?:driver'?s?|driving)\s+licen[cs]e(?:{_ID_NOUN})?|{_ID_CUE}{_ID_NOUN}|"
            r"(?:national|tax|taxpayer)\s+ID)"
            rf"(?:\s*(?:is|was|reads|:|=|\#|-)\s*|\s+){{1,3}}[\"'“]?{_ID_VALUE}"
        ),
        E.ID_NUMBER,
        0.85,
        "v",
        _id_value_ok,
        needles=("licen", "id", "number", "no.", "no ", "nr", "#", "num"),
    ),
)

# --- card and IBAN shapes (presidio's checksum recognizers run beside these) -----------------------


def luhn_ok(digits: str) -> bool:
    """Luhn (ISO/IEC 7812-1 annex B, :mod:`stdnum.luhn`) check over the digits of ``digits``, at
    least 12 of them."""
    nums = "".join(str(int(c)) for c in digits if c.isdigit())  # digits of any script, as ASCII
    return len(nums) >= 12 and luhn.is_valid(nums)


_IBAN_REGISTRY = numdb.get("iban")  # python-stdnum's copy of the SWIFT IBAN Registry (stdnum.iban's)


@cache
def iban_length(country: str) -> int | None:
    """Characters in an IBAN of ``country`` (two upper-case letters) by the SWIFT IBAN Registry as
    python-stdnum ships it, or ``None`` for a country missing from it.

    The registry gives the BBAN structure (``"8!n10!n"``: 8 digits, then 10); the IBAN adds the
    country code and two check digits.
    """
    bban = _IBAN_REGISTRY.info(country)[0][1].get("bban")
    return 4 + sum(int(n) for n in re.findall(r"(\d+)!", bban)) if bban else None


def iban_checksum_ok(compact: str) -> bool:
    """ISO 13616 / ISO 7064 MOD 97-10 check of an upper-case IBAN without separators.

    This is the checksum :func:`stdnum.iban.validate` runs (:mod:`stdnum.iso7064.mod_97_10`), on its
    own: ``stdnum.iban`` also requires a registered country, and this check is for the others.
    """
    return compact.isascii() and compact.isalnum() and mod_97_10.is_valid(compact[4:] + compact[:4])


def iban_shape_ok(value: str) -> bool:
    """Country code known and length right (the mod-97 checksum of those is presidio's, which scores
    higher); for a country missing from the registry (``IR``, or the look-alikes test data
    generators make for ``PH``, ``TH``), 14 to 34 characters and a valid mod-97 checksum."""
    compact = re.sub(r"[\s-]", "", value).upper()
    want = iban_length(compact[:2])
    if want is not None:
        return want == len(compact)
    return 14 <= len(compact) <= 34 and iban_checksum_ok(compact)


def iban_prefix_len(value: str) -> int:
    """Length of the prefix of ``value`` that holds exactly as many characters (separators aside) as
    an IBAN of its country code has, and ends at a word boundary; 0 if there is none.

    The shape pattern is greedy and case-insensitive, so it also takes the words after an IBAN
    (``de89 3704 0044 0532 0130 00 before``); this cuts the candidate back to the IBAN.
    """
    want = iban_length(value[:2].upper())
    count = 0
    best = 0
    for i, c in enumerate(value):
        if c.isalnum():
            count += 1
            rest = value[i + 1 : i + 2]
            at_boundary = not rest or not rest.isalnum()
            if want is not None and count == want:
                return i + 1 if at_boundary else 0
            if want is None and at_boundary and 14 <= count <= 34 and iban_shape_ok(value[: i + 1]):
                best = i + 1  # unknown country: the longest prefix with a valid checksum
    return best


SHAPE_RULES = (
    Rule(
        re.compile(r"(?<![\w-])(?:\d[ -]?){11,18}\d(?![\w-])"),
        E.CREDIT_CARD,
        0.8,
        0,
        luhn_ok,
        hint=re.compile(r"\d(?:[ -]?\d){11}"),
    ),
    Rule(
        re.compile(r"(?i)\b[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){11,30}\b"),
        E.IBAN_CODE,
        0.8,
        0,
        iban_shape_ok,
        trim=iban_prefix_len,
        hint=re.compile(r"\d\d(?<=(?i:[A-Z]{2})\d\d)"),
    ),
)


# --- phone numbers ---------------------------------------------------------------------------------

_PHONE_CANDIDATE = re.compile(r"(?<![\w+.-])(?:\+|00)?\(?\d[\d ().\-/]{4,22}\d(?:\s?(?:x|ext\.?|#)\s?\d{1,6})?(?![\w])")
_PHONE_CUE = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|cell|fax|call(?:\s+me)?(?:\s+(?:at|on))?|ring|whatsapp|number|nr|no)"
    r"\b[.:#]?\s*(?:is\s*)?[:#]?\s*\(?\+?$"
)
_PHONE_CORE = re.compile(r"\d[\d ().\-/]{4,22}\d")  # the candidate's core, digit first: a fast gate
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_DATE_LIKE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4}|\d{1,2}:\d{2}")
# Any region that accepts a number decides, so the most permissive plans go first (Germany's and
# Austria's allow 4-15 digits): most candidates are settled by the first parse.
_PHONE_REGIONS = (
    "DE",
    "AT",
    "US",
    "GB",
    "FR",
    "IT",
    "ES",
    "NL",
    "SE",
    "NO",
    "DK",
    "FI",
    "CH",
    "BE",
    "PL",
    "PT",
    "BR",
    "IN",
    "AU",
    "CA",
    "IL",
    "JP",
    "CN",
    "RU",
    "MX",
    "ZA",
    "IE",
    "CZ",
    "HU",
    "GR",
)


class PotluckPhoneRecognizer(EntityRecognizer):
    """Phone numbers: a broad candidate regex, then ``phonenumbers`` length/prefix checks.

    (Named apart from presidio's ``PhoneRecognizer``: presidio's loader finds predefined
    recognizers by class name among all ``EntityRecognizer`` subclasses in the process, so a
    second class of the same name could be picked instead of presidio's.)

    A candidate with a leading ``+``/``00`` is parsed as international; otherwise it is kept if it
    is a possible number in any of ``regions``. Dates and times are skipped. Candidates need 7 to
    15 digits (ITU-T E.164 caps numbers at 15 digits), or 6 right after a phone cue ("tel.",
    "call me at"; some plans, e.g. Luxembourg's, have 6-digit numbers). A ``+`` and a known country
    code with 8 or more digits is a phone number even where the metadata's lengths disagree
    (``+54 9 3427 2474``: Argentine mobiles carry an extra 9).
    """

    needs_digit = True  # the analyzer skips texts without digits

    def __init__(self, regions: Sequence[str] = _PHONE_REGIONS) -> None:
        self.regions = tuple(regions)
        super().__init__(supported_entities=[E.PHONE_NUMBER], name="PotluckPhoneRecognizer")

    def load(self) -> None:
        """Nothing to load."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if _PHONE_CORE.search(text) is None:
            return []
        out = []
        for m in _PHONE_CANDIDATE.finditer(text):
            cand = m.group(0)
            main = re.split(r"\s?(?:x|ext\.?|#)\s?(?=\d)", cand)[0]
            n_digits = sum(c.isdigit() for c in main)
            if not 6 <= n_digits <= 15 or _DATE_LIKE.search(cand) or _IPV4.fullmatch(cand):
                continue
            if n_digits == 6 and not _PHONE_CUE.search(text, max(0, m.start() - 30), m.start()):
                continue
            if self._possible(main) or (n_digits >= 8 and main.startswith("+") and self._country_code_ok(main)):
                out.append(RecognizerResult(E.PHONE_NUMBER, m.start(), m.end(), 0.45))
        return out

    def _possible(self, number: str) -> bool:
        """Possible as an international number (leading ``+``/``00``) or, failing that (``00`` also
        starts national numbers in some plans, e.g. ``009-735 25 17``), in any of ``regions``."""
        if number.startswith(("+", "00")):
            if self._possible_in("+" + number[2:] if number.startswith("00") else number, None):
                return True
            if number.startswith("+"):
                return False
        return any(self._possible_in(number, region) for region in self.regions)

    @staticmethod
    def _country_code_ok(number: str) -> bool:
        try:
            parsed = phonenumbers.parse(number, None)
        except phonenumbers.NumberParseException:
            return False
        code = parsed.country_code
        return code is not None and phonenumbers.region_code_for_country_code(code) != "ZZ"

    @staticmethod
    def _possible_in(number: str, region: str | None) -> bool:
        try:
            return phonenumbers.is_possible_number(phonenumbers.parse(number, region))
        except phonenumbers.NumberParseException:
            return False


class OfflineEmailRecognizer(EmailRecognizer):
    """presidio's email recognizer with the bundled public-suffix snapshot (never fetched)."""

    def analyze(
        self,
        text: str,
        entities: list[str],
        nlp_artifacts: NlpArtifacts | None = None,
        regex_flags: int | None = None,
    ) -> list[RecognizerResult]:
        if "@" not in text:
            return []
        return super().analyze(text, entities, nlp_artifacts, regex_flags)

    def load(self) -> None:
        self._extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
        self._extract("warm.up.example.com")  # builds the suffix trie now, not on the first e-mail

    def validate_result(self, pattern_text: str) -> bool:
        return self._extract(pattern_text).fqdn != ""


def own_recognizers() -> list[EntityRecognizer]:
    """Every recognizer defined in this module, ready for a presidio registry."""
    return [
        RegexRecognizer("PotluckSecretRecognizer", SECRET_RULES),
        RegexRecognizer("PotluckIdentifierRecognizer", OTHER_RULES),
        RegexRecognizer("PotluckIdNumberRecognizer", ID_RULES, _has_digit, needs_digit=True),
        RegexRecognizer("PotluckNumberShapeRecognizer", SHAPE_RULES, _has_digit, needs_digit=True),
        PotluckPhoneRecognizer(),
        OfflineEmailRecognizer(),
    ]
