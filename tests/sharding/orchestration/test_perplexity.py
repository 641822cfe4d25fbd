"""The perplexity scorer against a direct float64 computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from potluck.errors import RequestError
from potluck.sharding.orchestration import perplexity


def test_chunked_scoring_equals_the_direct_formula() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 70).tolist()
    logits = rng.normal(size=(70, 50)).astype(np.float32) * 3
    scorer = perplexity.score_tp(lambda chunk, pos: logits[pos : pos + len(chunk)], ids)
    z = logits[:-1].astype(np.float64)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    want = math.exp(-logp[np.arange(69), ids[1:]].mean())
    assert scorer.perplexity() == pytest.approx(want, rel=1e-9)
    other = perplexity.score_tp(lambda chunk, pos: -logits[pos : pos + len(chunk)], ids)
    report = perplexity.compare(Path("m.gguf"), 2, scorer, scorer)
    assert report.ratio == 1.0 and report.top1_agreement == 1.0 and report.n_tokens == 70
    assert perplexity.compare(Path("m.gguf"), 2, scorer, other).top1_agreement < 0.2


def test_window_needs_enough_tokens() -> None:
    assert perplexity.window_ids(lambda t: list(range(len(t))), "abcdef", 4) == [0, 1, 2, 3]
    with pytest.raises(RequestError, match="has 3 tokens, fewer than --ctx 4"):
        perplexity.window_ids(lambda t: list(range(len(t))), "abc", 4)
