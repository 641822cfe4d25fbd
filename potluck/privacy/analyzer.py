"""Detection: a presidio ``AnalyzerEngine`` that runs fully offline, and the overlap rule on top.

No spaCy model can be installed here and nothing may be downloaded at run time, so the engine
uses presidio's :class:`~presidio_analyzer.nlp_engine.NoOpNlpEngine` (no tokens, no NER) and only
recognizers that need no NLP artifacts:

* presidio's regex + checksum recognizers: credit cards (Luhn), IBAN (ISO 13616 mod 97),
  US SSN (invalid-range filter), IP addresses (``ipaddress`` validation), Bitcoin (Base58Check /
  bech32), MAC addresses, e-mail (offline public-suffix check);
* ours (:mod:`.recognizers`): provider keys and tokens, bearer/basic credentials, JWTs, private
  key blocks, passwords in assignments and URLs, high-entropy tokens, phone numbers
  (``phonenumbers``), passports, Ethereum/bech32 addresses, card and IBAN shapes;
* names, organisations and places (:mod:`.names`) and street addresses (:mod:`.addresses`) from
  word lists, casing and context.

Speed (the fixed cost per call dominates on chat-sized texts): presidio's recognizers run behind
gates that are their own patterns reduced to a necessary condition (tests/privacy/test_gates.py
checks each against the recognizer on generated texts), recognizers whose matches all hold a digit
are skipped for texts without one, and :class:`FastAnalyzerEngine` calls the fixed registry
without presidio's per-call registry lookup, context pass and duplicate removal.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from presidio_analyzer import AnalyzerEngine, EntityRecognizer, RecognizerRegistry, RecognizerResult
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
from presidio_analyzer.nlp_engine import NlpArtifacts, NoOpNlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    CryptoRecognizer,
    IbanRecognizer,
    IpRecognizer,
    MacAddressRecognizer,
    UsSsnRecognizer,
)

from potluck.errors import PrivacyError
from potluck.privacy.addresses import AddressRecognizer
from potluck.privacy.entities import Span, resolve_overlaps
from potluck.privacy.lexicon import Lexicon
from potluck.privacy.names import ProperNounRecognizer
from potluck.privacy.recognizers import own_recognizers

log = logging.getLogger(__name__)


_DIGIT = re.compile(r"\d")
# Gates: each is its recognizer's pattern(s) with anchors, look-arounds and context removed, so a
# text the gate rejects cannot match (presidio's patterns use [0-9]; \d is a superset).
# Each starts with a single character class (or literal), which lets the regex engine skip ahead to
# candidate characters instead of trying a match at every position: several times faster.
# [0-9] as presidio writes it (a plain set is also what the skip-ahead handles; \d is not).
_CARD_HINT = re.compile(r"[0-9][0-9]{3}[- ]?[0-9]{3,4}[- ]?[0-9]{3,4}[- ]?[0-9]{3}")  # CreditCardRecognizer
_CARD_HINT_UNICODE = re.compile(r"\d{4}[- ]?\d{3,4}[- ]?\d{3,4}[- ]?\d{3}")  # its pattern says \d
_IBAN_HINT = re.compile(r"[0-9][0-9](?<=[A-Z]{2}[0-9]{2})")  # IbanRecognizer: country code + check digits
# UsSsnRecognizer: d5-d4, d3-d6, d3-d2-d4, d9, d3[- .]d2[- .]d4, each a whole word (\b both ends;
# the ASCII word class here is narrower than any \w, so the gate stays a necessary condition)
_SSN_HINT = re.compile(
    r"[0-9](?<![A-Za-z0-9_][0-9])[0-9]{2}(?:[0-9]{2}-[0-9]{4}|-[0-9]{6}|[- .][0-9]{2}[- .][0-9]{4}|[0-9]{6})"
    r"(?![A-Za-z0-9_])"
)
_IPV4_HINT = re.compile(r"[0-9]\.[0-9]")  # IpRecognizer's IPv4 patterns
_IPV6_HINT = re.compile(r":(?:(?<=[0-9A-Fa-f]:)[0-9A-Fa-f]|:)")  # ... IPv6 ones: "::" or hex:hex
_BTC_HINT = re.compile(r"[13][a-zA-HJ-NP-Z0-9]{25}")  # CryptoRecognizer: (bc1|[13]) + 25 or more
_MAC_HINT = re.compile(  # MacAddressRecognizer: "aa:bb:" / "aa-bb-" / "aabb.ccdd"
    r"[:.-](?:(?<=[0-9A-Fa-f]{2}[:-])[0-9A-Fa-f]{2}[:-]|(?<=[0-9A-Fa-f]{4}\.)[0-9A-Fa-f]{4})"
)


def _card_hint(text: str) -> bool:
    return _CARD_HINT.search(text) is not None or (not text.isascii() and _CARD_HINT_UNICODE.search(text) is not None)


def _ip_hint(text: str) -> bool:
    return ("." in text and _IPV4_HINT.search(text) is not None) or (
        ":" in text and _IPV6_HINT.search(text) is not None
    )


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


class NoContextEnhancer(ContextAwareEnhancer):
    """Context words cannot be used without tokens (no-op NLP engine); our context rules live in the
    recognizers' own patterns instead. Returns the results unchanged."""

    def __init__(self) -> None:
        super().__init__(
            context_similarity_factor=0.0,
            min_score_with_context_similarity=0.0,
            context_prefix_count=0,
            context_suffix_count=0,
        )

    def enhance_using_context(
        self,
        text: str,
        raw_results: list[RecognizerResult],
        nlp_artifacts: NlpArtifacts,
        recognizers: list[EntityRecognizer],
        context: list[str] | None = None,
    ) -> list[RecognizerResult]:
        return raw_results


class GatedRecognizer(EntityRecognizer):
    """Runs ``inner`` only on texts for which the cheap ``gate`` holds (a speed-up, never a filter:
    every gate is a necessary condition of the inner patterns)."""

    def __init__(self, inner: EntityRecognizer, gate: Callable[[str], object], needs_digit: bool = False) -> None:
        self.inner = inner
        self.gate = gate
        self.needs_digit = needs_digit  # every match holds a digit: the engine skips digit-free texts
        super().__init__(
            supported_entities=list(inner.supported_entities),
            name=f"Gated{type(inner).__name__}",
            supported_language=inner.supported_language,
            context=list(inner.context),
        )

    def load(self) -> None:
        """The inner recognizer loaded itself."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if not self.gate(text):
            return []
        return self.inner.analyze(text, entities, nlp_artifacts)  # type: ignore[arg-type]


class FastAnalyzerEngine(AnalyzerEngine):
    """presidio's engine for a registry that is fixed once built, with a lean default call.

    :meth:`analyze` with the arguments :class:`Detector` uses (all entities, precomputed NLP
    artifacts, no allow list, context or trace) runs every recognizer of the registry and keeps the
    results scoring at least ``score_threshold`` (and above zero). It skips what costs time per call
    and decides nothing here: the registry lookup and supported-entity list (computed once), the
    context pass (it needs tokens the no-op NLP engine does not produce) and presidio's duplicate
    removal (:func:`~potluck.privacy.entities.resolve_overlaps` resolves every overlap afterwards,
    contained same-type spans included). Any other call goes through presidio's full path.
    """

    _frozen: tuple[list[EntityRecognizer], list[str], list[EntityRecognizer]] | None = None

    def _enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        return raw_results

    def get_supported_entities(self, language: str | None = None) -> list[str]:
        return list(self._recognizers_and_entities()[1])

    def _recognizers_and_entities(self) -> tuple[list[EntityRecognizer], list[str], list[EntityRecognizer]]:
        """(all recognizers, their entities, those that can match a text without digits)."""
        if self._frozen is None:
            recognizers = self.registry.get_recognizers(language="en", all_fields=True)
            for rec in recognizers:
                if not rec.is_loaded:
                    rec.load()
                    rec.is_loaded = True
            entities = sorted({e for rec in recognizers for e in rec.get_supported_entities()})
            digit_free = [rec for rec in recognizers if not getattr(rec, "needs_digit", False)]
            self._frozen = (recognizers, entities, digit_free)
        return self._frozen

    def analyze(
        self,
        text: str,
        language: str,
        entities: list[str] | None = None,
        correlation_id: str | None = None,
        score_threshold: float | None = None,
        return_decision_process: bool | None = False,
        ad_hoc_recognizers: list[EntityRecognizer] | None = None,
        context: list[str] | None = None,
        allow_list: list[str] | None = None,
        allow_list_match: str | None = "exact",
        regex_flags: int | None = re.DOTALL | re.MULTILINE | re.IGNORECASE,
        nlp_artifacts: NlpArtifacts | None = None,
    ) -> list[RecognizerResult]:
        if (
            entities
            or ad_hoc_recognizers
            or allow_list
            or context
            or return_decision_process
            or nlp_artifacts is None
            or language != "en"
        ):
            return super().analyze(
                text,
                language,
                entities,
                correlation_id,
                score_threshold,
                return_decision_process,
                ad_hoc_recognizers,
                context,
                allow_list,
                allow_list_match,
                regex_flags,
                nlp_artifacts,
            )
        recognizers, all_entities, digit_free = self._recognizers_and_entities()
        if _DIGIT.search(text) is None:
            recognizers = digit_free
        threshold = self.default_score_threshold if score_threshold is None else score_threshold
        results: list[RecognizerResult] = []
        for rec in recognizers:
            found = rec.analyze(text, all_entities, nlp_artifacts)
            if found:
                results.extend(r for r in found if r.score >= threshold and r.score > 0)
        return results


def build_engine(lexicon: Lexicon | None = None) -> AnalyzerEngine:
    """A presidio ``AnalyzerEngine`` with the recognizers listed in the module docstring.

    Raises:
        PrivacyError: presidio could not be set up (nothing can be sanitized: fail closed).
    """
    lex = lexicon or Lexicon.load()
    try:
        nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
        nlp.load()
        registry = RecognizerRegistry(supported_languages=["en"])
        gated: tuple[tuple[EntityRecognizer, Callable[[str], object]], ...] = (
            (CreditCardRecognizer(), _card_hint),
            (IbanRecognizer(), _IBAN_HINT.search),
            (UsSsnRecognizer(), _SSN_HINT.search),
            (IpRecognizer(), _ip_hint),  # "fe::ab" has no digit
            (CryptoRecognizer(), _BTC_HINT.search),  # "1", "3" or "bc1" first
            (MacAddressRecognizer(), _MAC_HINT.search),  # "aa:bb:cc:dd:ee:ff" has no digit
        )
        for inner, gate in gated:
            needs_digit = not isinstance(inner, (IpRecognizer, MacAddressRecognizer))
            registry.add_recognizer(GatedRecognizer(inner, gate, needs_digit))
        for rec in own_recognizers():
            registry.add_recognizer(rec)
        registry.add_recognizer(ProperNounRecognizer(lex))
        registry.add_recognizer(AddressRecognizer(lex))
        return FastAnalyzerEngine(
            registry=registry,
            nlp_engine=nlp,
            supported_languages=["en"],
            default_score_threshold=0.0,
            context_aware_enhancer=NoContextEnhancer(),
        )
    except (ValueError, TypeError, ImportError, OSError) as exc:
        raise PrivacyError(f"cannot set up the presidio analyzer: {exc}") from exc


class Detector:
    """Finds sensitive spans in text.

    Args:
        engine: a presidio engine (default :func:`build_engine`).
        min_score: detections scoring below this are dropped.
    """

    def __init__(self, engine: AnalyzerEngine | None = None, min_score: float = 0.0) -> None:
        self.engine = engine or build_engine()
        self.min_score = min_score
        # the no-op NLP engine's artifacts are empty and identical for every text: build them once
        self._artifacts = self.engine.nlp_engine.process_text("", "en") if engine is None else None

    def detect(self, text: str) -> list[Span]:
        """Disjoint sensitive spans of ``text``, sorted by start (overlaps: the longest wins).

        Raises:
            PrivacyError: detection failed; the caller must send nothing (fail closed).
        """
        if not text:
            return []
        try:
            results = self.engine.analyze(
                text=text, language="en", score_threshold=self.min_score, nlp_artifacts=self._artifacts
            )
        except Exception as exc:  # any failure inside presidio or a recognizer: fail closed
            log.error("sensitive-data detection failed: %s", type(exc).__name__)
            raise PrivacyError(f"sensitive-data detection failed ({type(exc).__name__}); nothing was sent") from exc
        return [Span(r.start, r.end, r.entity_type, r.score) for r in resolve_overlaps(results)]
