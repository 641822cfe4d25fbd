"""Typed placeholders (``<PERSON_1>``, ``<EMAIL_ADDRESS_2>``) and the in-memory mapping behind them.

The mapping lives only in the originating node's memory, one per request. If it must ever be
persisted it is encrypted first (:meth:`PlaceholderMap.encrypt`, Fernet: AES-128-CBC + HMAC-SHA256,
from ``cryptography``).

Collision safety: before numbering, every placeholder-like text already present in the input
(``<PERSON_1>``, ``person 1``, ``EMAIL_ADDRESS_3`` ...) is *reserved*, so no placeholder we hand out
equals text the user wrote; restoration then leaves the user's own look-alikes untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

from cryptography.fernet import Fernet, InvalidToken

from potluck.errors import PrivacyError

# Anything a model or a user might write as a placeholder: TYPE words, a separator, a number.
# Found from the number backwards: the scan looks for digits only (a fast skip over everything
# else), then the up to four words before the separator are matched on the reversed text.
_NUMBER_AFTER_WORD = re.compile(r"\d(?<=[A-Za-z][ _]\d)\d{0,5}(?!\d)")
# the same for ASCII text: a plain [0-9] set lets the regex engine skip ahead (\d does not)
_NUMBER_AFTER_WORD_ASCII = re.compile(r"[0-9](?<=[A-Za-z][ _][0-9])[0-9]{0,5}(?![0-9])")
_TYPE_WORDS_REVERSED = re.compile(r"[A-Za-z]+(?:[ _][A-Za-z]+){0,3}")
_SEPARATOR = re.compile(r"[ _]")


def placeholder_text(entity_type: str, number: int) -> str:
    """The canonical placeholder, e.g. ``placeholder_text("PERSON", 1) == "<PERSON_1>"``."""
    return f"<{entity_type}_{number}>"


class PlaceholderMap:
    """Value <-> placeholder for one request; numbers count up per type from 1.

    The same value always gets the same placeholder (in every message of a chat history).
    """

    def __init__(self) -> None:
        self._by_value: dict[str, str] = {}
        self._by_placeholder: dict[str, str] = {}
        self._next: dict[str, int] = {}
        self._reserved: set[tuple[str, int]] = set()

    def reserve_from(self, texts: Iterable[str]) -> None:
        """Reserve the (type, number) of every placeholder-like text in ``texts`` (collision safety)."""
        for text in texts:
            for m in (_NUMBER_AFTER_WORD_ASCII if text.isascii() else _NUMBER_AFTER_WORD).finditer(text):
                sep = m.start() - 1
                before = _TYPE_WORDS_REVERSED.match(text[max(0, sep - 80) : sep][::-1])
                if before is None:
                    continue
                words = _SEPARATOR.split(before.group(0)[::-1].upper())
                number = int(m.group(0))
                # "EMAIL ADDRESS 1" reserves EMAIL_ADDRESS_1 and ADDRESS_1
                for i in range(len(words)):
                    self._reserved.add(("_".join(words[i:]), number))

    def placeholder_for(self, value: str, entity_type: str) -> str:
        """The placeholder of ``value``, allocating ``<TYPE_n>`` with the next free ``n``."""
        known = self._by_value.get(value)
        if known is not None:
            return known
        n = self._next.get(entity_type, 1)
        while (entity_type, n) in self._reserved:
            n += 1
        self._next[entity_type] = n + 1
        ph = placeholder_text(entity_type, n)
        self._by_value[value] = ph
        self._by_placeholder[ph] = value
        return ph

    @property
    def mapping(self) -> Mapping[str, str]:
        """Placeholder -> original value (read-only view)."""
        return dict(self._by_placeholder)

    def __len__(self) -> int:
        return len(self._by_placeholder)

    # --- persistence (only ever encrypted) ----------------------------------------------------------

    def encrypt(self, key: bytes) -> bytes:
        """The mapping as a Fernet token (``key`` from :func:`cryptography.fernet.Fernet.generate_key`)."""
        payload = {"map": self._by_placeholder, "next": self._next, "reserved": sorted(self._reserved)}
        return Fernet(key).encrypt(json.dumps(payload).encode())

    @classmethod
    def decrypt(cls, token: bytes, key: bytes) -> PlaceholderMap:
        """Inverse of :meth:`encrypt`.

        Raises:
            PrivacyError: wrong key, tampered or malformed token.
        """
        try:
            payload = json.loads(Fernet(key).decrypt(token))
            out = cls()
            for ph, value in payload["map"].items():
                out._by_placeholder[str(ph)] = str(value)
                out._by_value.setdefault(str(value), str(ph))
            out._next = {str(k): int(v) for k, v in payload["next"].items()}
            out._reserved = {(str(t), int(n)) for t, n in payload["reserved"]}
            return out
        except (InvalidToken, ValueError, KeyError, TypeError) as exc:
            raise PrivacyError("cannot decrypt the placeholder mapping (wrong key or tampered)") from exc
