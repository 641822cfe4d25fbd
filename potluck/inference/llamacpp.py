"""The llama.cpp backend, on llama-cpp-python (https://llama-cpp-python.readthedocs.io).

Generation uses ``Llama.generate`` (which reuses the KV cache for a shared prompt prefix) and
decodes token bytes incrementally, so multi-byte UTF-8 characters split across tokens come out
whole. Chat prompts come from :mod:`potluck.inference.chat`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from potluck.errors import GenerationError, ModelError, ModelFileError, RequestError
from potluck.inference.backend import (
    GRAMMAR,
    LOGPROBS,
    ChatPrompt,
    GeneratedToken,
    model_info,
    seeded,
    text_tokens,
)
from potluck.inference.chat import ChatTemplate
from potluck.inference.gguf_file import inspect_gguf
from potluck.inference.grammar import checked_grammar
from potluck.inference.logprobs import token_logprobs
from potluck.routing.request import ChatMessage, SamplingParams
from potluck.routing.route import ModelInfo

log = logging.getLogger(__name__)


def build_has_amx() -> bool:
    """True when the loaded llama.cpp build was compiled with its AMX kernels.

    With GCC 12 those kernels crash on quantized matmuls of more than one token (llama.cpp
    issue #20824); see ``../shared/models/README.md``.
    """
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" in info


class LlamaCppBackend:
    """A GGUF model on llama.cpp (grammars and logprobs supported: ``features``).

    Args:
        path: GGUF file.
        model_id: name the API serves it under.
        n_ctx: context length (capped by the model's training context).
        n_threads: compute threads (``None``: all cores).
        n_batch: prompt-processing batch size (tokens).
    """

    def __init__(
        self, path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512
    ) -> None:
        self.features = frozenset({GRAMMAR, LOGPROBS})
        self._path = path
        self._summary = inspect_gguf(path)
        ctx_cap = self._summary.context_length or n_ctx
        self._n_ctx = min(n_ctx, ctx_cap)
        self._n_threads = n_threads or os.cpu_count() or 1
        self._n_batch = n_batch
        self._llm: Any = None  # llama_cpp.Llama once loaded
        self._info = model_info(self._summary, model_id, self._n_ctx, str(path))
        self._chat = ChatTemplate(None)
        self._bos_text = ""

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> None:
        """Load the weights into llama.cpp.

        Raises:
            ModelFileError: llama.cpp rejects the file.
            ModelError: llama-cpp-python is not installed.
        """
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelError("llama-cpp-python is not installed: run scripts/install.sh") from exc
        n_batch = self._n_batch
        if build_has_amx() and self._summary.quantization not in ("F32", "F16", "BF16"):
            log.warning(
                "this llama.cpp build has AMX kernels, which crash on quantized models when built "
                "with GCC 12; evaluating one token per batch (slower prefill). Reinstall with "
                "scripts/install.sh for full speed."
            )
            n_batch = 1
        try:
            self._llm = Llama(
                model_path=str(self._path),
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                n_batch=n_batch,
                n_ubatch=n_batch,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(f"llama.cpp could not load {self._path}: {exc}") from exc
        llm = self._llm
        eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="replace")
        bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="replace")
        self._bos_text = bos
        self._chat = ChatTemplate(self._summary.chat_template, bos_token=bos, eos_token=eos)
        log.info(
            "loaded %s (%s, %s, %d layers, %.1f M params, ctx %d)",
            self._info.model_id,
            self._info.architecture,
            self._info.quantization,
            self._info.n_layers,
            self._info.n_params / 1e6,
            self._n_ctx,
        )

    def _require(self) -> Any:
        if self._llm is None:
            raise ModelError("model is not loaded")
        return self._llm

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        llm = self._require()
        bos = self._bos_text
        if add_bos and bos and text.startswith(bos):
            add_bos = False  # the chat template already wrote it
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def render_chat(self, messages: Sequence[ChatMessage], tools: str | None = None) -> ChatPrompt:
        return self._chat.render(messages, tools)

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GeneratedToken]:
        llm = self._require()
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= self._n_ctx:
            raise RequestError(f"prompt is {len(tokens)} tokens; the context holds {self._n_ctx}")
        params = seeded(params, min(params.max_tokens, self._n_ctx - len(tokens)))
        llm.set_seed(params.seed & 0xFFFFFFFF)  # type: ignore[operator]
        grammar = checked_grammar(llm._model.vocab, params.grammar) if params.grammar is not None else None
        logprobs: dict[int, Any] = {}  # position -> TokenLogprob, filled by _sample
        try:
            for n, token in enumerate(
                text_tokens(self._sample(llm, tokens, params, cancel, grammar, logprobs), lambda t: llm.detokenize([t]))
            ):
                yield replace(token, logprob=logprobs.pop(n, None)) if params.logprobs is not None else token
        except (RuntimeError, ValueError) as exc:
            raise GenerationError(f"llama.cpp failed while generating: {exc}") from exc

    @staticmethod
    def _sample(
        llm: Any,
        tokens: list[int],
        params: SamplingParams,
        cancel: threading.Event,
        grammar: Any = None,
        logprobs: dict[int, Any] | None = None,
    ) -> Iterator[int]:
        """Token ids from ``Llama.generate`` until end-of-generation, ``cancel`` or the budget.

        With ``params.logprobs`` set, ``logprobs[i]`` receives the i-th token's
        :class:`~potluck.routing.route.TokenLogprob`, from the logits row it was sampled from
        (``llama_get_logits_ith(ctx, -1)``, still current when ``generate`` yields the token).
        """
        import llama_cpp
        import numpy as np

        vocab = llm._model.vocab
        n_vocab = llm.n_vocab()
        stream = llm.generate(
            tokens,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=0.0,
            repeat_penalty=1.0,
            grammar=grammar,
        )
        for n, token in enumerate(stream, start=1):
            if cancel.is_set() or llama_cpp.llama_vocab_is_eog(vocab, token):
                return
            if params.logprobs is not None and logprobs is not None:
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))  # (V,) float32
                logprobs[n - 1] = token_logprobs(row, token, params.logprobs, lambda t: llm.detokenize([t]))
            yield token
            if n >= params.max_tokens:
                return

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
