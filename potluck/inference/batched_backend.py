"""The llama.cpp backend with continuous batching: up to ``n_slots`` generations at once.

It is :class:`~potluck.inference.llamacpp.LlamaCppBackend` (loading, tokenizing, chat templates,
tools) whose :meth:`generate` runs on a :class:`~potluck.inference.batched.BatchEngine` sharing
the loaded weights. The runner lets ``max_concurrency`` generations call :meth:`generate` at once
(:mod:`potluck.inference.runner`); they decode together in one llama.cpp batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from potluck.errors import ModelError, RequestError
from potluck.inference.backend import GeneratedToken, seeded, text_tokens
from potluck.inference.batched import BatchEngine, SampledToken
from potluck.inference.llamacpp import LlamaCppBackend, build_has_amx
from potluck.inference.threads import ThreadPolicy
from potluck.routing.request import SamplingParams

log = logging.getLogger(__name__)


class BatchedLlamaCppBackend(LlamaCppBackend):
    """A GGUF model on llama.cpp decoding up to ``n_slots`` sequences in one batch.

    Args:
        path, model_id, n_ctx, n_batch: as for :class:`LlamaCppBackend` (``n_ctx`` per sequence).
        n_slots: sequences decoded together (``--parallel``).
        n_threads: compute threads; ``None``: adaptive, the cores other processes leave free
            (:class:`~potluck.inference.threads.ThreadPolicy`).
    """

    def __init__(
        self,
        path: Path,
        model_id: str,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_slots: int = 4,
    ) -> None:
        super().__init__(path, model_id, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch)
        self.max_concurrency = n_slots
        self._policy = ThreadPolicy(max_threads=self._n_threads) if n_threads is None else None
        self._engine: BatchEngine | None = None

    @property
    def engine(self) -> BatchEngine:
        if self._engine is None:
            raise ModelError("model is not loaded")
        return self._engine

    @property
    def decode_tps(self) -> float:
        """Measured single-stream decode tokens/s (0 before the first measurement)."""
        return self._engine.decode_tps if self._engine is not None else 0.0

    def load(self) -> None:
        """Load the weights, create the batched context and measure decode speed once.

        Raises:
            ModelFileError: llama.cpp rejects the file.
            ModelError: llama-cpp-python is missing, or the batched context cannot be created.
        """
        super().load()
        llm = self._llm
        amx = build_has_amx() and self._summary.quantization not in ("F32", "F16", "BF16")
        threads = self._policy() if self._policy is not None else self._n_threads
        self._engine = BatchEngine(
            llm._model.model,
            n_ctx=self._n_ctx,
            n_slots=self.max_concurrency,
            n_threads=threads,
            token_bytes=lambda t: llm.detokenize([t]),
            n_batch=self._n_batch,
            n_ubatch=1 if amx else self._n_batch,
            thread_policy=self._policy,
        )
        self._calibrate()
        log.info(
            "%s: %d batch slots, %d threads, %.1f decode tokens/s",
            self.info.model_id,
            self.max_concurrency,
            self._engine.n_threads,
            self._engine.decode_tps,
        )

    def _calibrate(self, n_tokens: int = 8) -> None:
        """Decode a few greedy tokens after BOS so ``decode_tps`` is known before any request."""
        llm = self._llm
        prompt = [llm.token_bos()] if llm.token_bos() >= 0 else [0]
        params = SamplingParams(max_tokens=n_tokens, temperature=0.0, seed=0)
        for _ in self.engine.generate(prompt, params, threading.Event()):
            pass

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GeneratedToken]:
        engine = self.engine
        llm: Any = self._llm
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= self._n_ctx:
            raise RequestError(f"prompt is {len(tokens)} tokens; the context holds {self._n_ctx}")
        if not tokens:
            raise RequestError("the prompt is empty", param="prompt")
        params = seeded(params, min(params.max_tokens, self._n_ctx - len(tokens)))
        sampled: list[SampledToken] = []  # the one just yielded by ids(), for its logprob

        def ids() -> Iterator[int]:
            for s in engine.generate(tokens, params, cancel):
                sampled[:] = [s]
                yield s.token_id

        for token in text_tokens(ids(), lambda t: llm.detokenize([t])):
            lp = sampled[0].logprob if token.token_id >= 0 and sampled else None
            yield replace(token, logprob=lp) if lp is not None else token

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        super().close()
