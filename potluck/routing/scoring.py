"""The score of a candidate: predicted latency, plus what its cost and its trust are worth in seconds.

IslandRun (ARCHITECTURE.md, "Routing a request") scores latency, cost and trust after the hard
constraints. Here every term is in seconds, lower is better::

    share       = 1 + LOAD_SHARE * queue                    the engine is shared with ``queue`` others
    per_token_s = share / tps                               tps: measured single-stream decode speed
    prefill_s   = share * prompt_tokens / (tps * PREFILL_SPEEDUP)   a prompt is evaluated in batches
    ttft_s      = rtt_s + prefill_s + per_token_s
    latency_s   = ttft_s + (max_tokens - 1) * per_token_s
    score       = latency_s * (1 + distrust * (1 - reputation)) + cost_weight_s * cost + tier_s * tier

``tps`` is what this node measured itself on that route (first token to last, EWMA), else what the
destination advertises (a peer's signed ``Hardware.decode_tps``), else a prior (the mean of the
other candidates' known speeds, or ``DEFAULT_TPS``). ``queue`` is the destination's queue depth
plus its running generations: a node's engine decodes up to its batch slots together (continuous
batching), so each stream it adds slows every stream it runs; ``LOAD_SHARE`` is that slowdown per
stream (1.0 would be an even split of a fixed throughput; batched decoding on a CPU gains some
aggregate throughput, hence less). Queued requests beyond the slots wait longer than this predicts. ``cost`` is the
price of ``prompt_tokens`` in and ``max_tokens`` out (:class:`~potluck.routing.candidates.Price`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from potluck.routing.candidates import Candidate

DEFAULT_TPS = 20.0  # tokens/s assumed when no candidate's speed is known
DEFAULT_RTT_S = 0.05  # a remote link whose RTT was never measured
LOAD_SHARE = 0.6  # per-stream slowdown for each other stream the destination runs or queues
PREFILL_SPEEDUP = 8.0  # prompt tokens per decode-token time (batched prompt evaluation)
CHARS_PER_TOKEN = 4.0  # prompt length estimate before tokenization
_EWMA = 0.3  # weight of a new measurement


@dataclass(frozen=True)
class Weights:
    """How cost and trust trade against latency.

    Attributes:
        cost_s: seconds of latency one unit of cost (``cloud_prices``' currency) is worth.
        tier_s: seconds added per trust tier (0 this device .. 3 cloud): data that stays closer is
            worth waiting a little for.
        distrust: how much a peer's predicted latency is inflated at reputation 0 (a fraction,
            scaled by ``1 - reputation``; the verification subsystem gives 0.5 without evidence).
            Peers that fail verification are excluded outright, not scored.
    """

    cost_s: float = 1000.0
    tier_s: float = 0.5
    distrust: float = 0.2


@dataclass(frozen=True)
class Prediction:
    """A candidate's predicted latency (seconds), cost and score (lower is better)."""

    tps: float
    tps_source: str  # "measured here", "advertised", "prior"
    ttft_s: float
    latency_s: float
    cost: float
    trust_s: float
    score: float


@dataclass
class RouteStats:
    """Decode speeds this node measured on each route (keyed by :attr:`Candidate.key`), EWMA."""

    tps: dict[str, float] = field(default_factory=dict)

    def observe(self, key: str, tokens: int, seconds: float) -> None:
        """Record ``tokens`` generated in ``seconds`` after the first token (ignored when too few)."""
        if tokens < 4 or seconds <= 0:
            return
        tps = tokens / seconds
        old = self.tps.get(key)
        self.tps[key] = tps if old is None else (1 - _EWMA) * old + _EWMA * tps


def estimate_prompt_tokens(chars: int) -> int:
    """Prompt tokens estimated from its length in characters."""
    return max(1, round(chars / CHARS_PER_TOKEN))


def predict(
    c: Candidate,
    prompt_tokens: int,
    max_tokens: int,
    reputation: float,
    stats: RouteStats,
    prior_tps: float,
    weights: Weights,
) -> Prediction:
    """Score one candidate (module docstring); ``reputation`` in [0, 1]."""
    if c.key in stats.tps:
        tps, source = stats.tps[c.key], "measured here"
    elif c.decode_tps:
        tps, source = c.decode_tps, "advertised"
    else:
        tps, source = prior_tps, "prior"
    per_token = (1.0 + LOAD_SHARE * c.queue) / max(tps, 1e-3)
    prefill = prompt_tokens * per_token / PREFILL_SPEEDUP
    rtt = c.rtt_s if c.rtt_s is not None else DEFAULT_RTT_S
    ttft = rtt + prefill + per_token
    latency = ttft + (max_tokens - 1) * per_token
    cost = c.price.cost(prompt_tokens, max_tokens) if c.price is not None else 0.0
    distrust = weights.distrust * (1.0 - min(1.0, max(0.0, reputation)))
    trust = latency * distrust + weights.tier_s * int(c.tier)
    score = latency + weights.cost_s * cost + trust
    return Prediction(tps, source, ttft, latency, cost, trust, score)


def prior_tps(candidates: list[Candidate], stats: RouteStats) -> float:
    """The speed assumed for a never-measured candidate: the mean of the known ones, else ``DEFAULT_TPS``."""
    known = [stats.tps.get(c.key) or c.decode_tps for c in candidates]
    speeds = [s for s in known if s]
    return sum(speeds) / len(speeds) if speeds else DEFAULT_TPS
