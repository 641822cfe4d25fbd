"""A request's ranked candidates, and the route that walks them: one completion, resumed on failure.

:class:`RoutePlan` is what ``potluck route explain`` prints: every candidate with its prediction
(:mod:`potluck.routing.scoring`) and, when ruled out, why (:mod:`potluck.routing.constraints`);
allowed candidates first, best score first.

:class:`PlannedRoute` streams from the best allowed candidate. When it fails (a peer died, stalled,
was overloaded, or the privacy guard refused at send time), the next allowed candidate resumes the
same answer, across tiers where the policy allowed them (a dead peer -> the next peer -> the cloud,
sanitized): the request is replayed with the text already produced as ``continuation`` and the
remaining ``max_tokens``, so the client sees one completion (ARCHITECTURE.md, "Routing a request").
When every candidate of the plan has failed, the route asks for a fresh plan (the router first
refreshes its view of the swarm, e.g. a state sync, so a peer that is alive but whose record had
not reached us yet becomes a candidate) and goes on with candidates not tried yet, at most
``MAX_REPLANS`` times; then it tries the candidates left out only for backoff after earlier
failures (a peer that failed before may be alive again, e.g. restarted); only then does the client
see an error.
Candidates of tier >= 2 always run behind the privacy guard (:meth:`RoutePolicy.wrap`): this is
the one place it is applied.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from potluck.errors import (
    GenerationError,
    ModelLoading,
    ModelNotFound,
    NetworkError,
    Overloaded,
    PolicyRefused,
    PrivacyError,
    RequestError,
    ScopeRefused,
)
from potluck.identity import Tier
from potluck.routing.candidates import Candidate
from potluck.routing.constraints import Refusal, RoutePolicy
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, Route, RouteEvent, TextDelta
from potluck.routing.scoring import Prediction, RouteStats

log = logging.getLogger(__name__)

ROUTE_HEADER = "X-Potluck-Route"
MAX_REPLANS = 2  # fresh plans (after a view refresh) a failing request may take before it gives up
# Failures after which another candidate may succeed (the destination, not the request, is at fault).
_ROUTE_FAULTS = (NetworkError, GenerationError, Overloaded, ModelNotFound, ModelLoading, PrivacyError)


@dataclass(frozen=True)
class Ranked:
    """One candidate of a plan: its prediction, and why it is ruled out (``None``: allowed)."""

    candidate: Candidate
    prediction: Prediction
    refusal: Refusal | None = None

    @property
    def refused(self) -> str | None:
        """The reason it is ruled out, in words (``None``: allowed)."""
        return None if self.refusal is None else self.refusal.reason

    def as_dict(self) -> dict[str, Any]:
        c, p = self.candidate, self.prediction
        return {
            "key": c.key,
            "kind": c.kind,
            "target": c.target,
            "tier": int(c.tier),
            "allowed": self.refusal is None,
            "refused": self.refused,
            "constraint": None if self.refusal is None else self.refusal.kind,
            "score": round(p.score, 4),
            "predicted_ttft_s": round(p.ttft_s, 4),
            "predicted_latency_s": round(p.latency_s, 4),
            "tps": round(p.tps, 2),
            "tps_source": p.tps_source,
            "queue": c.queue,
            "rtt_ms": None if c.rtt_s is None else round(c.rtt_s * 1000, 2),
            "cost": p.cost,
            "trust_s": round(p.trust_s, 4),
        }


@dataclass(frozen=True)
class RoutePlan:
    """Every candidate of one request: allowed ones first by score, then the ruled-out ones."""

    model: str
    ranked: tuple[Ranked, ...]

    @property
    def allowed(self) -> list[Ranked]:
        return [r for r in self.ranked if r.refusal is None]

    @property
    def first(self) -> Ranked:
        """The candidate tried first (the best allowed one, else the best last resort)."""
        return (self.allowed + self.last_resort)[0]

    @property
    def last_resort(self) -> list[Ranked]:
        """Candidates left out only for backoff after failures: tried when every allowed one failed."""
        return [r for r in self.ranked if r.refusal is not None and r.refusal.kind == "backoff"]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "candidates": [r.as_dict() for r in self.ranked]}

    def why(self, chosen: Ranked) -> str:
        """Why ``chosen`` was taken, in words (for ``X-Potluck-Route``)."""
        allowed = self.allowed
        position = next((i for i, r in enumerate(allowed) if r is chosen), None)
        ruled_out = len(self.ranked) - len(allowed)
        if position is None:
            rank = f"last resort ({chosen.refused}), score"
        else:
            rank = "best score" if position == 0 else f"rank {position + 1} (failover)"
        return (
            f"{rank} {chosen.prediction.score:.3f} (predicted latency {chosen.prediction.latency_s:.3f} s) "
            f"of {len(allowed)} allowed, {ruled_out} ruled out"
        )


class PlannedRoute:
    """The route of one request: the plan's allowed candidates, tried best first (module docstring).

    Args:
        plan: the ranked candidates; at least one allowed.
        policy: the privacy guard, applied to every candidate of tier >= 2.
        stats: where measured decode speeds are recorded.
        replan: a fresh plan of the same request after a view refresh (``None``: none).

    Attributes:
        observe: set by the caller before streaming to wrap each candidate's unguarded route
            (e.g. to record what leaves this node); ``None``: nothing.
        chosen: the candidate that produced the first event (``None`` until then).
        failures: ``(candidate key, error)`` of the candidates that failed, in order.
    """

    def __init__(
        self,
        plan: RoutePlan,
        policy: RoutePolicy | None,
        stats: RouteStats,
        replan: Callable[[], Awaitable[RoutePlan]] | None = None,
    ) -> None:
        assert plan.allowed or plan.last_resort, "a planned route needs a candidate to try"
        self.plan = plan
        self.policy = policy
        self.stats = stats
        self.replan = replan
        self.observe: Callable[[Candidate, Route], Route] | None = None
        self.chosen: Ranked | None = None
        self.failures: list[tuple[str, str]] = []
        self._why = ""

    @property
    def model_id(self) -> str:
        return self.plan.model

    @property
    def tier(self) -> Tier:
        """Tier of the candidate streaming now (before the start: the best allowed one)."""
        return (self.chosen or self.plan.first).candidate.tier

    def route_header(self, local_target: str = "") -> str:
        """``X-Potluck-Route``: ``<kind>; target=<whom>; key=<candidate>; why="<reason>"`` (a local
        candidate without a target shows ``local_target``, this node's peer ID)."""
        ranked = self.chosen or self.plan.first
        c = ranked.candidate
        why = self._why or self.plan.why(ranked)
        if self.failures:
            why += "; after " + ", ".join(f"{k} failed" for k, _ in self.failures)
        return f'{c.kind}; target={c.target or local_target}; key={c.key}; why="{why}"'

    def _route(self, c: Candidate) -> Route:
        route = c.route if self.observe is None else self.observe(c, c.route)
        if c.tier >= Tier.COMMUNITY:
            if self.policy is None:  # constraints rule this out; never send unguarded
                raise PrivacyError("no privacy guard for a tier >= 2 route; nothing was sent")
            route = self.policy.wrap(route)
        return route

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        """Yield one completion's deltas and one ``Finished``, failing over along the plan.

        A candidate that refuses the request (``RequestError``: e.g. a parameter it cannot apply;
        ``ScopeRefused`` / ``PolicyRefused`` from the guard) is passed over like a failed one.

        Raises:
            RequestError: every candidate failed and one refused the request (the first such).
            The last candidate's error when every allowed candidate failed.
        """
        produced: list[str] = []
        tokens_done = 0
        last: Exception | None = None
        refused: RequestError | None = None
        tried: set[str] = set()
        replans = 0
        while True:
            ranked = next((r for r in self.plan.allowed if r.candidate.key not in tried), None)
            if ranked is None and (self.replan is None or replans >= MAX_REPLANS):
                ranked = next((r for r in self.plan.last_resort if r.candidate.key not in tried), None)
                if ranked is None:
                    break
            elif ranked is None:
                assert self.replan is not None
                replans += 1
                try:
                    self.plan = await self.replan()
                except (ModelNotFound, ModelLoading) as exc:
                    log.info("no fresh plan for %s: %s", self.model_id, exc)
                    break
                continue
            c = ranked.candidate
            tried.add(c.key)
            if tokens_done >= request.params.max_tokens:  # the answer was complete; only Finished was lost
                yield Finished("length", 0, tokens_done)
                return
            if produced:
                log.warning("resuming %s on %s after %d tokens", self.model_id, c.key, tokens_done)
            sub = replace(
                request,
                continuation=request.continuation + "".join(produced),
                params=replace(request.params, max_tokens=request.params.max_tokens - tokens_done),
            )
            tokens_before, t_first, n_after_first = tokens_done, 0.0, 0
            try:
                async with aclosing(self._route(c).stream(sub)) as events:
                    async for event in events:
                        if self.chosen is None:
                            self.chosen, self._why = ranked, self.plan.why(ranked)
                        if isinstance(event, TextDelta):
                            if t_first == 0.0:
                                t_first = time.perf_counter()
                            else:
                                n_after_first += event.n_tokens
                            produced.append(event.text)
                            tokens_done += event.n_tokens
                            yield event
                        elif isinstance(event, Finished):
                            if t_first:
                                self.stats.observe(c.key, n_after_first, time.perf_counter() - t_first)
                            # A resumed route counted the replayed text as prompt; report the original.
                            yield Finished(
                                event.finish_reason,
                                max(0, event.prompt_tokens - tokens_before),
                                tokens_before + event.completion_tokens,
                            )
                            return
                raise GenerationError(f"{c.key} ended the stream without finishing")
            except RequestError as exc:
                refused = refused or exc
                last = exc
                self.failures.append((c.key, f"{type(exc).__name__}: {exc}"))
            except (PolicyRefused, ScopeRefused, *_ROUTE_FAULTS) as exc:
                last = exc
                self.failures.append((c.key, f"{type(exc).__name__}: {exc}"))
                log.warning("route %s failed serving %s: %s", c.key, self.model_id, exc)
        assert last is not None
        raise refused or last
