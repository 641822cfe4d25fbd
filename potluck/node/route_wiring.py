"""Wiring of the router's seams: the privacy guard as its policy, reputation, weights and limits.

Routing is a contract and imports no subsystem (docs/LAYERS.md); the node hands it what its score
and constraints need (:class:`potluck.routing.planner.Planner`). This is the one place the privacy
guard is attached: the router wraps every candidate of tier >= 2 in it.
"""

from __future__ import annotations

from collections.abc import Callable

from potluck.config import Settings
from potluck.privacy.guard import PrivacyGuard
from potluck.routing.candidates import Price
from potluck.routing.constraints import Limits
from potluck.routing.router import Router
from potluck.routing.scoring import Weights


def wire_router(
    router: Router,
    settings: Settings,
    peer_id: str,
    guard: PrivacyGuard,
    reputation: Callable[[str], float] | None = None,
) -> None:
    """Attach ``guard`` (the policy), ``reputation`` (a peer ID -> [0, 1]; ``None``: 1.0 for every
    peer) and the ``route_*`` settings to ``router``."""
    router.peer_id = peer_id
    planner = router.planner
    planner.policy = guard
    if reputation is not None:
        planner.reputation = reputation
    planner.weights = Weights(cost_s=settings.route_cost_weight_s)
    planner.limits = Limits(max_cost=settings.route_max_cost, min_reputation=settings.route_min_reputation)


def cloud_prices(settings: Settings) -> dict[str, Price]:
    """The ``cloud_prices`` setting as routing prices (per 1M tokens)."""
    return {name: Price(p.input, p.output) for name, p in settings.cloud_prices.items()}
