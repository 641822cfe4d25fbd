"""Reputation: a decaying score in [0, 1] per peer, from the attestations in the cluster state.

Each attestation counts with a weight ``w = decay * trust``:

* ``decay = 0.5 ** (age / HALF_LIFE_S)``: old verdicts fade, so a peer that changed its file is
  judged on what it serves now;
* ``trust`` is 1 for this node's own verdicts; :data:`OTHERS_WEIGHT` for a verdict by a peer this
  node has itself found honest (own-only score at least :data:`TRUSTED_ATTESTER`); 0 otherwise, so a
  swarm of fresh identities cannot vote an honest peer out (they are shown, not counted).

The score is the mean of a Beta(1, 1) prior updated with the weighted verdicts, a failure weighing
:data:`FAIL_WEIGHT` times a pass (the challenge tolerance leaves honest engines a 3x margin, so
one failure is strong evidence): ``(1 + P) / (2 + P + FAIL_WEIGHT * F)``. No evidence gives 0.5.
A peer whose score is below :data:`EXCLUDE_BELOW` is excluded from routing; with no passes, one
own failure does it (1 / 6).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from potluck.overlay.verification.attestations import Attestation

HALF_LIFE_S = 3600.0
FAIL_WEIGHT = 4.0
OTHERS_WEIGHT = 0.5
TRUSTED_ATTESTER = 0.6
EXCLUDE_BELOW = 0.4


@dataclass(frozen=True)
class Standing:
    """What the attestations say about one peer.

    Attributes:
        reputation: the score in [0, 1] (0.5 without evidence).
        passes: counted passing verdicts (any age).
        fails: counted failing verdicts (any age).
        latest: the most recent counted verdict, if any.
        excluded: why the peer is excluded from routing, or ``None``.
    """

    reputation: float = 0.5
    passes: int = 0
    fails: int = 0
    latest: Attestation | None = None
    excluded: str | None = None


def _score(weighted: Iterable[tuple[Attestation, float]]) -> float:
    p = f = 0.0
    for a, w in weighted:
        if a.verdict == "pass":
            p += w
        else:
            f += w
    return (1.0 + p) / (2.0 + p + FAIL_WEIGHT * f)


def standings(attestations: Iterable[Attestation], me: str, now: float) -> dict[str, Standing]:
    """Every attested peer's standing as seen by ``me`` at Unix time ``now``."""
    by_subject: dict[str, list[Attestation]] = defaultdict(list)
    for a in attestations:
        if a.subject != a.attester:  # a peer's word on itself counts for nothing
            by_subject[a.subject].append(a)

    def decay(a: Attestation) -> float:
        return float(0.5 ** (max(0.0, now - a.at) / HALF_LIFE_S))

    own_score = {s: _score((a, decay(a)) for a in atts if a.attester == me) for s, atts in by_subject.items()}

    def trust(a: Attestation) -> float:
        if a.attester == me:
            return 1.0
        return OTHERS_WEIGHT if own_score.get(a.attester, 0.0) >= TRUSTED_ATTESTER else 0.0

    out: dict[str, Standing] = {}
    for subject, atts in by_subject.items():
        counted = [(a, decay(a) * trust(a)) for a in atts if trust(a) > 0]
        rep = _score(counted)
        latest = max((a for a, _ in counted), key=lambda a: a.at, default=None)
        excluded = None
        if rep < EXCLUDE_BELOW:
            fail = max((a for a, _ in counted if a.verdict == "fail"), key=lambda a: a.at)
            excluded = f"failed {fail.method} check by {fail.attester[-8:]}: {fail.detail}"
        out[subject] = Standing(
            round(rep, 4),
            sum(1 for a, _ in counted if a.verdict == "pass"),
            sum(1 for a, _ in counted if a.verdict == "fail"),
            latest,
            excluded,
        )
    return out
