from __future__ import annotations

import pytest

from potluck.errors import PolicyRefused, RequestError
from potluck.identity import Tier
from potluck.privacy.policy import Action, decide, enforce_strict, parse_level


def test_parse_level():
    assert parse_level(None, "standard") == "standard"
    assert parse_level(" STRICT ", "off") == "strict"
    assert parse_level("", "strict") == "strict"
    with pytest.raises(RequestError):
        parse_level("lax", "standard")


@pytest.mark.parametrize("level", ["strict", "standard", "off"])
def test_trusted_tiers_get_raw(level):
    assert decide(level, Tier.LOCAL) is Action.SEND_RAW
    assert decide(level, Tier.OWN) is Action.SEND_RAW


def test_untrusted_tiers():
    assert decide("standard", Tier.COMMUNITY) is Action.SANITIZE
    assert decide("strict", Tier.CLOUD) is Action.SANITIZE
    assert decide("off", Tier.CLOUD) is Action.SEND_RAW


def test_strict_refuses_sensitive_beyond_own_devices():
    enforce_strict("strict", Tier.CLOUD, 0)
    enforce_strict("strict", Tier.OWN, 3)
    enforce_strict("standard", Tier.CLOUD, 3)
    with pytest.raises(PolicyRefused):
        enforce_strict("strict", Tier.COMMUNITY, 1)
