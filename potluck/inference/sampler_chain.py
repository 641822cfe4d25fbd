"""One llama.cpp sampler chain per sequence, built from :class:`SamplingParams`.

The chain follows llama.cpp's sampler API (``llama_sampler_chain_*``, ``include/llama.h``):
``grammar -> top_k -> top_p -> temperature -> dist(seed)``, or ``grammar -> greedy`` when the
temperature is 0. Each chain owns its grammar state and RNG, so sequences decoded together in one
batch sample independently (:mod:`potluck.inference.batched`).
"""

from __future__ import annotations

from typing import Any

from potluck.errors import RequestError
from potluck.inference.grammar import MAX_GRAMMAR_CHARS
from potluck.routing.request import SamplingParams


class SamplerChain:
    """A ``llama_sampler`` chain for one sequence. Not thread-safe: the decode thread owns it.

    Args:
        vocab: the model's ``llama_vocab`` pointer.
        params: sampling parameters; ``params.seed`` must be set (see ``backend.seeded``).

    Raises:
        RequestError: the grammar is too long or llama.cpp cannot parse it (``param="grammar"``).
    """

    def __init__(self, vocab: Any, params: SamplingParams) -> None:
        import llama_cpp as L

        self._chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        try:
            if params.grammar is not None:
                if len(params.grammar) > MAX_GRAMMAR_CHARS:
                    raise RequestError(
                        f"grammar of {len(params.grammar)} characters exceeds {MAX_GRAMMAR_CHARS}", param="grammar"
                    )
                grammar = L.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
                if not grammar:
                    raise RequestError("llama.cpp could not parse the output grammar (GBNF)", param="grammar")
                L.llama_sampler_chain_add(self._chain, grammar)
            if params.temperature <= 0:
                L.llama_sampler_chain_add(self._chain, L.llama_sampler_init_greedy())
            else:
                if params.top_k > 0:
                    L.llama_sampler_chain_add(self._chain, L.llama_sampler_init_top_k(params.top_k))
                if params.top_p < 1.0:
                    L.llama_sampler_chain_add(self._chain, L.llama_sampler_init_top_p(params.top_p, 1))
                L.llama_sampler_chain_add(self._chain, L.llama_sampler_init_temp(params.temperature))
                seed = (params.seed if params.seed is not None else 0) & 0xFFFFFFFF
                L.llama_sampler_chain_add(self._chain, L.llama_sampler_init_dist(seed))
        except BaseException:
            self.close()
            raise

    def sample(self, ctx: Any, index: int) -> int:
        """Sample (and accept) a token from output ``index`` of the last ``llama_decode`` on ``ctx``."""
        import llama_cpp as L

        return int(L.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        """Free the chain and its samplers (idempotent)."""
        import llama_cpp as L

        if self._chain is not None:
            L.llama_sampler_free(self._chain)
            self._chain = None
