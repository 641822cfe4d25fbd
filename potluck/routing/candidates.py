"""Candidates: every place one request could run, with what the router knows about each.

The router (:mod:`potluck.routing.router`) asks each :class:`CandidateSource` for the candidates of a
model and ranks them (:mod:`potluck.routing.scoring`) after the hard constraints
(:mod:`potluck.routing.constraints`); ARCHITECTURE.md, "Routing a request" (IslandRun: local, a
peer, a tensor-parallel group, the cloud).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from potluck.identity import Tier
from potluck.routing.route import Route

RouteKind = Literal["local", "tp", "peer", "cloud"]


@dataclass(frozen=True)
class Price:
    """Per-token prices of a paid model, in the currency of the ``cloud_prices`` setting per
    1,000,000 tokens (input: prompt tokens, output: generated tokens)."""

    input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Cost of one request, in the price's currency."""
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class Candidate:
    """One route a request could take, and the inputs of its predicted latency.

    Attributes:
        key: stable name, unique per request: ``local``, ``tp``, ``peer:<peer ID>``, ``cloud:<model>``
            (what ``X-Potluck-Route-Pin`` names).
        kind: ``local`` / ``tp`` / ``peer`` / ``cloud``.
        target: whom it runs on: this node's peer ID, ``<N> ranks``, the peer's ID, ``cloud/<model>``.
        route: the route itself (unguarded; the router puts tier >= 2 behind the privacy guard).
        decode_tps: measured decode speed in tokens/s (a peer's signed ``Hardware.decode_tps``),
            ``None`` when never measured.
        queue: requests ahead of this one (queue depth + active generations).
        rtt_s: measured link round trip in seconds (0 for this node, ``None`` when unmeasured).
        price: per-token prices; ``None`` for hardware in the swarm (free).
        peer: the peer ID whose reputation applies (``None`` for this node and the cloud).
        excluded: why the source already rules it out (e.g. failed verification), else ``None``.
        backoff: why it is left out for now after failures (a peer in backoff), else ``None``; such
            a candidate is still tried as a last resort when every allowed one has failed.
    """

    key: str
    kind: RouteKind
    target: str
    route: Route
    decode_tps: float | None = None
    queue: int = 0
    rtt_s: float | None = 0.0
    price: Price | None = None
    peer: str | None = None
    excluded: str | None = None
    backoff: str | None = None

    @property
    def tier(self) -> Tier:
        """The route's trust tier."""
        return self.route.tier


class CandidateSource(Protocol):
    """A source of candidates beyond this node's own models (the swarm, the cloud)."""

    def candidates(self, model: str) -> list[Candidate]:
        """Every route this source has for ``model`` now, including ones it excludes (with the reason)."""
        ...
