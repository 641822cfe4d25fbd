"""What a caller may do beyond plain completions: the per-API-key scopes, and the checks on them.

A request carries its caller's scopes in :attr:`GenerationRequest.scopes
<potluck.routing.request.GenerationRequest.scopes>` (set by the HTTP API from the caller's key,
:mod:`potluck.node.auth`). Two scopes exist:

* ``cloud`` (:data:`CLOUD`): the request may run on a cloud route (trust tier 3, ``cloud/<model>``),
  which spends the node owner's upstream API key;
* ``privacy-override`` (:data:`PRIVACY_OVERRIDE`): ``X-Potluck-Privacy: off`` is honoured, i.e. the
  request may leave this node unsanitized.

A request built without scopes has none (fail closed). The router excludes candidates a request
may not use (:func:`route_permitted`); the privacy guard, which every tier >= 2 route passes
through, refuses what slips past (:func:`require_route_scopes`, raising
:class:`~potluck.errors.ScopeRefused`, HTTP 403).
"""

from __future__ import annotations

from typing import Final

from potluck.errors import ScopeRefused
from potluck.identity import Tier

CLOUD: Final = "cloud"
PRIVACY_OVERRIDE: Final = "privacy-override"
ALL_SCOPES: Final = frozenset({CLOUD, PRIVACY_OVERRIDE})


def route_permitted(tier: int, scopes: frozenset[str]) -> bool:
    """May a caller holding ``scopes`` use a route of trust ``tier`` (0 local ... 3 cloud)?

    Only cloud routes (tier 3) need a scope (``cloud``). A hard constraint for the router: a
    candidate for which this is False is never tried, not even as a failover target.
    """
    return tier < Tier.CLOUD or CLOUD in scopes


def require_route_scopes(tier: int, scopes: frozenset[str], *, raw: bool, destination: str) -> None:
    """Refuse a request its caller's scopes do not allow on a route of ``tier``.

    Args:
        tier: the route's trust tier (0 local, 1 own devices, 2 community, 3 cloud).
        scopes: the caller's scopes (:attr:`GenerationRequest.scopes`).
        raw: the request would leave unsanitized because of ``X-Potluck-Privacy: off``.
        destination: the route's model id, for the message.

    Raises:
        ScopeRefused: a cloud route without ``cloud``, or an unsanitized request to tier >= 2
            without ``privacy-override``; nothing was sent.
    """
    if not route_permitted(tier, scopes):
        raise ScopeRefused(
            f"the API key lacks the '{CLOUD}' scope needed for cloud model {destination!r}; nothing was sent",
            scope=CLOUD,
        )
    if raw and tier >= Tier.COMMUNITY and PRIVACY_OVERRIDE not in scopes:
        raise ScopeRefused(
            f"X-Potluck-Privacy: off needs the '{PRIVACY_OVERRIDE}' scope on the API key; nothing was sent",
            scope=PRIVACY_OVERRIDE,
        )
