"""Challenges: nonce-salted prompts, and the tolerance that decides whether an answer is honest.

A challenge is a plain-text prompt built from a 16-byte random nonce (:func:`prompt_for`: words of
a fixed list picked by the nonce's SHA-256 stream), so no answer can be precomputed or cached, and
``n`` tokens are asked for: the greedy continuation (temperature 0, argmax at every position, so
no seed matters) with each token's bytes, its natural-log probability and the gap between the best
and the runner-up token there. Both sides run it through their node's own route for the model
(:class:`RouteChallengeModel`: the path real requests take, with ``logprobs=2``).

The checker holds the same GGUF (same SHA-256), runs the same prompt and compares
(:func:`judge`), position by position:

1. equal tokens must have logprobs within :data:`LOGPROB_TOLERANCE`;
2. the first differing token is tolerated only where the local top-2 gap is at most
   :data:`GAP_EPSILON` (a near tie, which another summation order can flip); the contexts differ
   after it, so the comparison stops there, and at least :data:`MIN_COMPARED` tokens must have
   been compared for a pass (fewer: inconclusive, no verdict);
3. any other difference fails.

Why these bounds (measured on the tinyshakespeare fixtures with llama.cpp 0.3.36 on CPU): the same
F16 file with 1 vs 2 threads and a batch of 1 vs 512 tokens moves a logprob by at most 0.0015 nats;
F16 vs F32 of the same weights by 0.002; Q8_0 instead of F16 by about 0.03; Q4_0 instead of F16 by
0.1 to 0.33 over 16 tokens. GPU and CPU kernels on the same weights are reported to differ by
about 1e-2 nats, so ``LOGPROB_TOLERANCE = 0.05`` leaves honest engines a margin of 3x or more and
still catches a Q4_0 file sold as F16 (a Q8_0 one sits inside it: a stated limit). When every
logprob can be off by ``LOGPROB_TOLERANCE``, two tokens closer than twice that can swap places,
hence ``GAP_EPSILON = 2 * LOGPROB_TOLERANCE``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from potluck.errors import GenerationError
from potluck.routing.request import GenerationRequest, SamplingParams
from potluck.routing.route import Finished, ServedModelRoute, TextDelta, TokenLogprob

CHALLENGE_TOKENS = 16
MIN_COMPARED = 8  # tokens compared before a near-tie split, for a pass
PROMPT_WORDS = 12
LOGPROB_TOLERANCE = 0.05  # nats
GAP_EPSILON = 2 * LOGPROB_TOLERANCE  # nats
_NO_RUNNER_UP = 1e4  # gap reported when the distribution has a single token

_WORDS = (
    "king queen crown sword night rose honour death love blood heaven earth father son daughter "
    "mother brother sister lord lady court castle field river stone fire water wind storm sun moon "
    "star gold silver iron bread wine ship sea road house door window garden tree flower bird horse "
    "dog friend enemy war peace time morning evening winter summer truth grace heart hand eye voice"
).split()


def prompt_for(nonce: bytes, words: int = PROMPT_WORDS) -> str:
    """The challenge prompt of ``nonce``: ``words`` words of a 64-word list and a newline."""
    stream = hashlib.sha256(b"potluck-challenge/1\x00" + nonce).digest()
    return " ".join(_WORDS[b % len(_WORDS)] for b in stream[:words]).capitalize() + "\n"


@dataclass(frozen=True)
class Answer:
    """A greedy walk: each token's bytes, natural-log probability and best-vs-runner-up gap (nats)."""

    tokens: tuple[bytes, ...]
    logprobs: tuple[float, ...]
    gaps: tuple[float, ...]


class ChallengeModel(Protocol):
    """A model this node holds, able to run a challenge."""

    async def answer(self, prompt: str, n_tokens: int) -> Answer:
        """The greedy walk of at most ``n_tokens`` after ``prompt`` (shorter if the model ends it).

        Raises:
            GenerationError / Overloaded / RequestError: the model could not run it.
        """
        ...


def _gap(entry: TokenLogprob) -> float:
    top = entry.top
    if len(top) < 2:
        return _NO_RUNNER_UP
    return max(0.0, min(_NO_RUNNER_UP, top[0].logprob - top[1].logprob))


class RouteChallengeModel:
    """A :class:`ChallengeModel` on a local route of the node (what serves real requests).

    Args:
        route: a route whose backend reports logprobs (llama.cpp).
    """

    def __init__(self, route: ServedModelRoute) -> None:
        self.route = route

    async def answer(self, prompt: str, n_tokens: int) -> Answer:
        params = SamplingParams(max_tokens=n_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0, logprobs=2)
        request = GenerationRequest(model=self.route.model_id, params=params, prompt=prompt)
        entries: list[TokenLogprob] = []
        async for event in self.route.stream(request):
            if isinstance(event, TextDelta):
                entries.extend(event.logprobs)
            elif isinstance(event, Finished) and event.completion_tokens != len(entries):
                raise GenerationError(f"{event.completion_tokens} tokens came with {len(entries)} logprobs")
        return Answer(
            tuple(e.token_bytes for e in entries[:n_tokens]),
            tuple(max(-1e4, min(0.0, e.logprob)) for e in entries[:n_tokens]),
            tuple(_gap(e) for e in entries[:n_tokens]),
        )


Outcome = tuple[Literal["pass", "fail"] | None, str]


def _compare(a: Answer, b: Answer, tolerance: float, ties: Sequence[bool]) -> Outcome:
    """Walk two answers; ``ties[i]``: a split at ``i`` is a tolerated near tie."""
    n = min(len(a.tokens), len(b.tokens))
    for i in range(n):
        if a.tokens[i] != b.tokens[i]:
            if not ties[i]:
                return "fail", f"token {i} differs where the model has no near tie"
            if i < MIN_COMPARED:
                return None, f"split at a near tie after {i} tokens"
            return "pass", f"{i} tokens within tolerance, then a near tie"
        if not abs(a.logprobs[i] - b.logprobs[i]) <= tolerance:
            return "fail", f"token {i}: logprob {a.logprobs[i]:.4f} vs {b.logprobs[i]:.4f} (tolerance {tolerance:g})"
    if len(a.tokens) != len(b.tokens) and n < MIN_COMPARED:
        return None, f"one answer ended after {n} tokens"
    return "pass", f"{n} tokens within tolerance"


def judge(peer: Answer, local: Answer, n_tokens: int) -> Outcome:
    """Check a peer's answer against this node's own answer to the same challenge.

    Returns:
        (``"pass"``, ``"fail"`` or ``None`` for inconclusive; why, in words).
    """
    if not len(peer.tokens) == len(peer.logprobs) == len(peer.gaps) or len(peer.tokens) > n_tokens:
        return "fail", f"malformed answer of {len(peer.tokens)} tokens for {n_tokens} asked"
    if any(not math.isfinite(x) for x in peer.logprobs):
        return "fail", "non-finite logprob"
    return _compare(peer, local, LOGPROB_TOLERANCE, [g <= GAP_EPSILON for g in local.gaps])


def agree(a: Answer, b: Answer) -> bool:
    """Whether two peers' answers to the same challenge fit the same model: equal tokens with
    logprobs within ``2 * LOGPROB_TOLERANCE`` (each may be off by the tolerance), up to a split
    where both report a near tie."""
    for x in (a, b):
        if not len(x.tokens) == len(x.logprobs) == len(x.gaps):
            return False
    ties = [ga <= GAP_EPSILON and gb <= GAP_EPSILON for ga, gb in zip(a.gaps, b.gaps, strict=False)]
    verdict, _ = _compare(a, b, 2 * LOGPROB_TOLERANCE, ties)
    return verdict != "fail"  # an early near-tie split is consistent, not evidence against either


def majority(answers: dict[str, Answer]) -> tuple[list[str], list[str]] | None:
    """Split peers into (consistent with the majority, not), or ``None`` when no strict majority
    of at least two peers agrees (too few answers, or a split vote)."""
    peers = sorted(answers)
    for p in peers:
        group = [q for q in peers if agree(answers[p], answers[q])]
        if len(group) >= 2 and len(group) * 2 > len(peers):
            return group, [q for q in peers if q not in group]
    return None
