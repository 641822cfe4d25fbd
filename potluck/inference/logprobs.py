"""Token log-probabilities from a logits row (OpenAI ``logprobs``/``top_logprobs``).

Pure numpy, backend-agnostic: any engine that can read the logits a token was sampled from
(llama.cpp's ``llama_get_logits_ith``, the tensor-parallel master's lm_head output) turns them into
:class:`~potluck.routing.route.TokenLogprob` here. The distribution is the model's own, before any
temperature, top-k/top-p or grammar (as llama.cpp's ``create_completion(logprobs=k)`` reports it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from potluck.routing.route import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


def log_softmax(logits: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Natural-log softmax of one logits row, in float64.

    Args:
        logits: shape ``(n_vocab,)``, any float dtype.

    Returns:
        shape ``(n_vocab,)``: ``logits - logsumexp(logits)``.
    """
    x = np.asarray(logits, dtype=np.float64)  # (V,)
    m = float(np.max(x))
    return x - (m + float(np.log(np.sum(np.exp(x - m)))))


def token_logprobs(logits: npt.ArrayLike, token_id: int, k: int, detok: Callable[[int], bytes]) -> TokenLogprob:
    """The log-probability of ``token_id`` and the ``k`` most likely tokens at one position.

    Args:
        logits: the raw logits row the token was sampled from, shape ``(n_vocab,)``.
        token_id: the sampled token.
        k: alternatives to list (0..:data:`MAX_TOP_LOGPROBS`), most likely first (ties: lower id first).
        detok: a token id's bytes (a multi-byte character's piece may be partial UTF-8; the text
            is decoded with replacement characters, the bytes are kept).

    Raises:
        ValueError: ``token_id`` is outside the vocabulary or ``k`` is out of range.
    """
    lp = log_softmax(logits)
    if not 0 <= token_id < lp.shape[0]:
        raise ValueError(f"token {token_id} is outside a vocabulary of {lp.shape[0]}")
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top logprobs k={k} is outside 0..{MAX_TOP_LOGPROBS}")
    top: tuple[TokenLogprob, ...] = ()
    if k:
        n = lp.shape[0]
        k_eff = min(k, n)
        kth = float(np.partition(lp, n - k_eff)[n - k_eff])  # the k-th largest logprob
        above = np.flatnonzero(lp > kth)  # fewer than k, all kept
        tied = np.flatnonzero(lp == kth)[: k_eff - above.size]  # ties at the cut: lowest ids
        idx = np.concatenate((above, tied))
        idx = idx[np.lexsort((idx, -lp[idx]))]  # by logprob desc, then id
        top = tuple(_entry(int(i), float(lp[i]), detok) for i in idx)
    return _entry(token_id, float(lp[token_id]), detok, top)


def _entry(
    token_id: int, logprob: float, detok: Callable[[int], bytes], top: tuple[TokenLogprob, ...] = ()
) -> TokenLogprob:
    raw = detok(token_id)
    return TokenLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, token_bytes=raw, top=top)
