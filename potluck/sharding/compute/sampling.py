"""Token sampling on the master: greedy, or top-k -> top-p -> temperature -> draw.

The order is llama.cpp's default sampler chain (``llama_sampler_chain``: top_k, top_p, temp,
dist; ``common/sampling.cpp``): top-p is measured on the temperature-1 distribution, then the
survivors are re-weighted by temperature. Nucleus sampling: Holtzman et al. 2019, §3.1.
"""

from __future__ import annotations

import numpy as np

from potluck.routing.request import SamplingParams


class Sampler:
    """Draws one token id per call from a logits row; seeded for reproducibility.

    Args:
        params: temperature (0 = greedy argmax), top_k (0 = off), top_p, seed (``None`` = random).
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Sample from float32 ``(vocab,)`` logits; returns a token id."""
        p = self.params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64)
        idx = np.argsort(-logits, kind="stable")
        if 0 < p.top_k < idx.size:
            idx = idx[: p.top_k]
        kept = logits[idx]
        if 0 < p.top_p < 1:
            probs = np.exp(kept - kept[0])
            probs /= probs.sum()
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            idx, kept = idx[:cut], kept[:cut]
        weights = np.exp((kept - kept[0]) / p.temperature)
        return int(idx[self._rng.choice(idx.size, p=weights / weights.sum())])
