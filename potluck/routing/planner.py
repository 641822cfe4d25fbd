"""The planner: constraints, then scores, over one request's candidates (IslandRun).

:meth:`Planner.plan` turns the candidates of a request (:mod:`potluck.routing.candidates`) into a
:class:`~potluck.routing.plan.RoutePlan`: each candidate is predicted
(:mod:`potluck.routing.scoring`), the hard constraints rule some out
(:mod:`potluck.routing.constraints`), and the allowed ones are ranked by score, best first.

Its inputs come in through small seams the node wires, since routing may import only contracts:
``policy`` (the privacy guard, :class:`~potluck.routing.constraints.RoutePolicy`), ``reputation``
(a peer ID -> [0, 1] callable; 1.0 until the verification subsystem provides one), the weights and
limits from the settings. ``stats`` are the decode speeds this node measured itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from potluck.routing.candidates import Candidate
from potluck.routing.constraints import Limits, RoutePolicy, refusals
from potluck.routing.plan import Ranked, RoutePlan
from potluck.routing.request import GenerationRequest
from potluck.routing.scoring import RouteStats, Weights, estimate_prompt_tokens, predict, prior_tps


def _full_trust(peer: str) -> float:
    return 1.0


@dataclass
class Planner:
    """Ranks candidates (module docstring).

    Attributes:
        policy: the privacy guard; ``None`` rules out every candidate of tier >= 2 (fail closed).
        reputation: a peer's reputation in [0, 1] (1: fully trusted).
        weights: how cost and trust trade against latency.
        limits: ``max_cost`` and ``min_reputation``.
        stats: decode speeds measured on each route.
    """

    policy: RoutePolicy | None = None
    reputation: Callable[[str], float] = _full_trust
    weights: Weights = field(default_factory=Weights)
    limits: Limits = field(default_factory=Limits)
    stats: RouteStats = field(default_factory=RouteStats)

    async def plan(self, request: GenerationRequest, model: str, candidates: list[Candidate]) -> RoutePlan:
        """Predict, constrain and rank ``candidates`` for ``request``.

        Raises:
            RequestError / PrivacyError: from the privacy policy (bad header, detection failed).
        """
        chars = sum(len(m.content) for m in request.messages or ()) + len(request.prompt or "")
        chars += len(request.continuation)
        prompt_tokens = estimate_prompt_tokens(chars)
        max_tokens = request.params.max_tokens
        prior = prior_tps(candidates, self.stats)
        reputation = {c.key: self.reputation(c.peer) for c in candidates if c.peer is not None}
        predictions = {
            c.key: predict(c, prompt_tokens, max_tokens, reputation.get(c.key, 1.0), self.stats, prior, self.weights)
            for c in candidates
        }
        cost = {k: p.cost for k, p in predictions.items()}
        refused = await refusals(request, candidates, self.policy, cost, reputation, self.limits)
        ranked = [Ranked(c, predictions[c.key], refused.get(c.key)) for c in candidates]
        ranked.sort(key=lambda r: (r.refusal is not None, r.prediction.score))
        return RoutePlan(model, tuple(ranked))
