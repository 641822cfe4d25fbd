"""Perplexity of the tensor-parallel engine beside llama.cpp's on the same window of text.

The standard check of an engine or a quantization (llama.cpp's ``llama-perplexity``): tokenize a
text, take one window of ``n_ctx`` tokens from its start (BOS prepended when the model adds one),
and score every token after the first under teacher forcing::

    NLL_t = -log softmax(logits_{t-1})[id_t],  t = 1 .. T-1      perplexity = exp(mean NLL)

Both engines score the same token ids, so their perplexities and their top-1 choices compare
directly (top-1 agreement: the fraction of positions where both engines' argmax is the same token).
Unlike ``llama-perplexity``, which scores only the second half of each of many windows, this
scores one window completely: the question here is whether two engines agree, not the model's
absolute quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import ModelError, ModelFileError, RequestError
from potluck.inference.llamacpp import build_has_amx

#: Teacher-forced positions scored per forward pass: bounds the logits held at once to
#: ``CHUNK x vocab`` float32 (32 MB at Gemma 3's 262k vocabulary).
CHUNK = 32


@dataclass(frozen=True)
class PerplexityReport:
    """One window scored by both engines.

    Attributes:
        n_tokens: tokens in the window (BOS included); ``n_tokens - 1`` are scored.
        nodes: tensor-parallel ranks of the TP engine.
        tp_perplexity / llama_cpp_perplexity: ``exp(mean NLL)`` in nats per token.
        ratio: ``tp_perplexity / llama_cpp_perplexity``.
        top1_agreement: fraction of scored positions where both engines' argmax token is the same.
    """

    model: str
    n_tokens: int
    nodes: int
    tp_perplexity: float
    llama_cpp_perplexity: float
    ratio: float
    top1_agreement: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Scorer:
    """Accumulates NLL and argmax over chunks of teacher-forced logits."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = np.asarray(ids, np.int64)
        self.nll: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []

    def add(self, start: int, logits: np.ndarray) -> None:
        """``logits`` float32 ``(R, vocab)`` of positions ``start .. start+R-1`` (the last position
        of the window predicts nothing and is dropped)."""
        rows = min(logits.shape[0], len(self.ids) - 1 - start)
        if rows <= 0:
            return
        z = logits[:rows].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logsumexp = np.log(np.exp(z).sum(axis=1))
        target = self.ids[start + 1 : start + 1 + rows]
        self.nll.append(logsumexp - z[np.arange(rows), target])
        self.top1.append(np.argmax(logits[:rows], axis=1))

    def perplexity(self) -> float:
        return float(math.exp(np.concatenate(self.nll).mean()))

    def argmax(self) -> np.ndarray:
        return np.concatenate(self.top1)


def window_ids(tokenize: Callable[[str], list[int]], text: str, n_ctx: int) -> list[int]:
    """The first ``n_ctx`` token ids of ``text`` (``tokenize`` adds BOS when the model does).

    Raises:
        RequestError: the text has fewer than 2 tokens, or fewer than ``n_ctx`` (say how many).
    """
    if n_ctx < 2:
        raise RequestError("a perplexity window needs at least 2 tokens")
    ids = tokenize(text)
    if len(ids) < n_ctx:
        raise RequestError(
            f"the text has {len(ids)} tokens, fewer than --ctx {n_ctx}: pass a longer file or a smaller --ctx"
        )
    return ids[:n_ctx]


def score_tp(forward: Callable[[list[int], int], np.ndarray], ids: list[int]) -> _Scorer:
    """Teacher-force ``ids`` through the TP master in chunks of :data:`CHUNK` positions.

    Args:
        forward: ``TPMaster.forward(ids, pos, all_logits=True)`` bound: float32 ``(len(ids), vocab)``.
    """
    scorer = _Scorer(ids)
    for start in range(0, len(ids) - 1, CHUNK):
        scorer.add(start, forward(ids[start : start + CHUNK], start))
    return scorer


def score_llama_cpp(model: Path, ids: list[int], threads: int) -> _Scorer:
    """Teacher-force ``ids`` through llama.cpp (llama-cpp-python, ``logits_all``) on the same GGUF.

    Raises:
        ModelError: llama-cpp-python is not installed.
        ModelFileError: llama.cpp cannot load the file.
    """
    try:
        from llama_cpp import Llama
    except ImportError as exc:  # pragma: no cover - the project depends on it
        raise ModelError("llama-cpp-python is needed for the llama.cpp side: pip install llama-cpp-python") from exc
    # The same guard as the llama.cpp backend: a build with AMX kernels crashes on quantized
    # multi-token batches (../shared/models/README.md), so it evaluates one token per batch.
    n_batch = 1 if build_has_amx() else min(512, len(ids))
    try:
        llm = Llama(
            model_path=str(model),
            n_ctx=len(ids),
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=threads,
            logits_all=True,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelFileError(f"llama.cpp could not load {model}: {exc}") from exc
    try:
        llm.eval(ids)
        scorer = _Scorer(ids)
        for start in range(0, len(ids) - 1, CHUNK):
            scorer.add(start, np.asarray(llm.scores[start : start + CHUNK], np.float32))
        return scorer
    finally:
        llm.close()


def compare(model: Path, nodes: int, tp: _Scorer, reference: _Scorer) -> PerplexityReport:
    """The report of two scorers of the same ids."""
    tp_ppl, ref_ppl = tp.perplexity(), reference.perplexity()
    return PerplexityReport(
        model=model.name,
        n_tokens=len(tp.ids),
        nodes=nodes,
        tp_perplexity=tp_ppl,
        llama_cpp_perplexity=ref_ppl,
        ratio=tp_ppl / ref_ppl,
        top1_agreement=float(np.mean(tp.argmax() == reference.argmax())),
    )
