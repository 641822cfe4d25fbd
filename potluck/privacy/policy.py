"""Trust tiers and the privacy policy: may this request go there, raw, sanitized, or not at all.

Tiers (ARCHITECTURE.md, "Identity and trust"), most to least trusted::

    0 LOCAL      this device
    1 OWN        my own devices (same swarm owner key or allowlist)
    2 COMMUNITY  community peers
    3 CLOUD      a cloud LLM

Privacy levels (setting ``privacy``, per request the ``X-Potluck-Privacy`` header):

* ``strict``: a request in which anything sensitive was detected never leaves tier <= 1;
* ``standard``: requests to tier >= 2 are sanitized (typed placeholders) first;
* ``off``: nothing is sanitized.

Data toward tier <= 1 is always sent as is. Fail closed: an unknown level in the header is an
error, never a fallback to a weaker level.
"""

from __future__ import annotations

import enum
from typing import Literal

from potluck.errors import PolicyRefused, RequestError
from potluck.identity import Tier

PRIVACY_HEADER = "x-potluck-privacy"
PrivacyLevel = Literal["strict", "standard", "off"]
LEVELS: tuple[PrivacyLevel, ...] = ("strict", "standard", "off")


class Action(enum.Enum):
    """What the policy allows for one request toward one destination."""

    SEND_RAW = "raw"
    SANITIZE = "sanitize"


def parse_level(value: str | None, default: PrivacyLevel) -> PrivacyLevel:
    """The privacy level of a request: its header value, or ``default`` when absent.

    Raises:
        RequestError: the header carries something other than strict/standard/off (HTTP 400).
    """
    if value is None or not value.strip():
        return default
    level = value.strip().lower()
    if level not in LEVELS:
        raise RequestError(f"X-Potluck-Privacy must be one of {', '.join(LEVELS)}, not {value!r}")
    return level


def decide(level: PrivacyLevel, tier: int) -> Action:
    """How a request at ``level`` may travel to a destination of ``tier`` (before detection).

    ``strict`` toward tier >= 2 returns SANITIZE; the caller then calls :func:`enforce_strict`
    with the detection result.
    """
    if tier <= Tier.OWN or level == "off":
        return Action.SEND_RAW
    return Action.SANITIZE


def enforce_strict(level: PrivacyLevel, tier: int, n_sensitive: int) -> None:
    """Refuse a strict-level request with sensitive content bound for tier >= 2.

    Raises:
        PolicyRefused: ``level == "strict"``, ``tier >= 2`` and ``n_sensitive > 0``.
    """
    if level == "strict" and tier >= Tier.COMMUNITY and n_sensitive > 0:
        raise PolicyRefused(
            f"privacy level 'strict': this request contains {n_sensitive} sensitive value(s) and may not "
            f"leave your own devices (destination tier {tier}); nothing was sent"
        )
