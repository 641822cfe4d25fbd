"""Hard constraints: which candidates a request may use at all, before any scoring.

IslandRun puts the privacy policy first (ARCHITECTURE.md, "Routing a request"). A candidate is
ruled out, with the reason shown in ``potluck route explain`` and ``X-Potluck-Route``, when:

* the privacy policy keeps the request off its tier (:class:`RoutePolicy`, implemented by the
  privacy guard: level ``strict`` keeps a request with sensitive content on tiers 0-1);
* it is a cloud route and the caller's API key lacks the ``cloud`` scope (``request.scopes``,
  :func:`potluck.routing.scopes.route_permitted`);
* its predicted cost exceeds the ``route_max_cost`` setting;
* its peer's reputation is below ``route_min_reputation``, or its source excluded it (failed
  verification), or its peer is in backoff after failures (tried only as a last resort,
  :mod:`potluck.routing.plan`);
* the request pins another route (``X-Potluck-Route-Pin``).

Routing is a contract: the privacy policy comes in through the :class:`RoutePolicy` protocol that
the node wires (the subsystem never imports privacy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from potluck.identity import Tier
from potluck.routing.candidates import Candidate
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Route
from potluck.routing.scopes import CLOUD, route_permitted

PIN_HEADER = "x-potluck-route-pin"


class RoutePolicy(Protocol):
    """The privacy policy as the router needs it (the node wires the privacy guard)."""

    async def refusal(self, request: GenerationRequest, tier: Tier) -> str | None:
        """Why ``request`` may not go to ``tier`` at all (``None``: it may, sanitized or raw).

        Raises:
            RequestError: a bad ``X-Potluck-Privacy`` value.
            PrivacyError: detection failed (fail closed).
        """
        ...

    def wrap(self, route: Route) -> Route:
        """``route`` behind the privacy guard (sanitize out, restore in)."""
        ...


RefusalKind = Literal["pin", "excluded", "backoff", "scope", "cost", "reputation", "privacy"]


@dataclass(frozen=True)
class Refusal:
    """Why a candidate is ruled out: which constraint (``kind``) and the reason in words."""

    kind: RefusalKind
    reason: str


@dataclass(frozen=True)
class Limits:
    """Numeric constraints: ``max_cost`` per request (0: none), ``min_reputation`` in [0, 1]."""

    max_cost: float = 0.0
    min_reputation: float = 0.0


async def refusals(
    request: GenerationRequest,
    candidates: list[Candidate],
    policy: RoutePolicy | None,
    cost: dict[str, float],
    reputation: dict[str, float],
    limits: Limits,
) -> dict[str, Refusal]:
    """Why each ruled-out candidate is ruled out, by :attr:`Candidate.key` (absent: allowed).

    ``cost`` and ``reputation`` are per candidate key. The policy is asked once per tier.

    Raises:
        RequestError / PrivacyError: from the policy.
    """
    out: dict[str, Refusal] = {}
    pin = request.header(PIN_HEADER)
    by_tier: dict[Tier, str | None] = {}
    for c in candidates:
        if pin is not None and c.key != pin.strip():
            out[c.key] = Refusal("pin", f"the request pins route {pin.strip()!r}")
        elif c.excluded is not None:
            out[c.key] = Refusal("excluded", c.excluded)
        elif c.backoff is not None:
            out[c.key] = Refusal("backoff", c.backoff)
        elif not route_permitted(c.tier, request.scopes):
            out[c.key] = Refusal("scope", f"the API key lacks the '{CLOUD}' scope")
        elif limits.max_cost > 0 and cost.get(c.key, 0.0) > limits.max_cost:
            out[c.key] = Refusal("cost", f"predicted cost {cost[c.key]:.6f} exceeds route_max_cost {limits.max_cost:g}")
        elif c.peer is not None and reputation.get(c.key, 1.0) < limits.min_reputation:
            out[c.key] = Refusal(
                "reputation",
                f"reputation {reputation[c.key]:.2f} is below route_min_reputation {limits.min_reputation:g}",
            )
        elif c.tier >= Tier.COMMUNITY:
            if policy is None:
                out[c.key] = Refusal("privacy", "no privacy guard is configured for tier >= 2 (fail closed)")
                continue
            if c.tier not in by_tier:
                by_tier[c.tier] = await policy.refusal(request, c.tier)
            reason = by_tier[c.tier]
            if reason is not None:
                out[c.key] = Refusal("privacy", reason)
    return out
