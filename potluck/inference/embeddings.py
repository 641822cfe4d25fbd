"""Sentence embeddings from a GGUF model on a llama.cpp context made for them (``embedding=True``).

One vector per input, pooled over the input's tokens as the GGUF says (``<arch>.pooling_type``:
llama.cpp's ``LLAMA_POOLING_TYPE_*``, mean, CLS or last token) and L2-normalized, as OpenAI's
``/v1/embeddings`` returns them (and llama-server with its default ``--embd-normalize 2``). A causal
LM such as SmolLM2 has no pooling metadata (its hidden states are per token); for those, and for a
GGUF that says ``none``, the engine mean-pools, which is what sentence-embedding recipes for
decoder models use when they have no trained pooling head. ``rank`` (a reranker) is refused.

The engine is blocking; callers run :meth:`EmbeddingEngine.embed` off the event loop. One lock
per engine serializes the llama.cpp context.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potluck.errors import ConfigError, GenerationError, ModelError, ModelFileError, RequestError
from potluck.inference.gguf_file import inspect_gguf

log = logging.getLogger(__name__)

#: llama.cpp's ``enum llama_pooling_type`` values (``include/llama.h``).
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST, POOLING_RANK = 0, 1, 2, 3, 4
POOLING_NAMES = {POOLING_NONE: "none", POOLING_MEAN: "mean", POOLING_CLS: "cls", POOLING_LAST: "last"}

#: One input: text, or token ids of the model's vocabulary.
EmbeddingInput = str | Sequence[int]


def gguf_pooling(path: Path, architecture: str) -> tuple[int, str]:
    """The pooling to use for the GGUF at ``path`` and why.

    Returns:
        ``(llama.cpp pooling type, reason)``: the GGUF's ``<arch>.pooling_type`` when it is mean,
        CLS or last; mean when the key is absent (a causal LM) or says ``none``.

    Raises:
        ConfigError: the GGUF is a reranker (``rank`` pooling), not an embedding model.
    """
    from gguf import GGUFReader

    from potluck.inference.gguf_file import field_value

    value = field_value(GGUFReader(path, "r"), f"{architecture}.pooling_type")
    if value is None:
        return POOLING_MEAN, "mean (the GGUF has no pooling type: a causal LM; potluck mean-pools its tokens)"
    pooling = int(value)
    if pooling == POOLING_RANK:
        raise ConfigError(f"{path} is a reranker (pooling type 'rank'), not an embedding model")
    if pooling not in (POOLING_MEAN, POOLING_CLS, POOLING_LAST):
        return POOLING_MEAN, f"mean (the GGUF says pooling type {pooling}, which yields no sentence vector)"
    return pooling, f"{POOLING_NAMES[pooling]} (from the GGUF)"


@dataclass(frozen=True)
class Embeddings:
    """The result of :meth:`EmbeddingEngine.embed`.

    Attributes:
        vectors: one L2-normalized vector per input, in input order; shape ``(n_inputs, n_embd)``.
        n_tokens: tokens evaluated over all inputs (OpenAI ``usage.prompt_tokens``).
    """

    vectors: list[list[float]]
    n_tokens: int


class EmbeddingEngine:
    """A GGUF loaded for embeddings on llama.cpp.

    Args:
        path: GGUF file.
        model_id: the name the API serves it under.
        n_ctx: most tokens per input (capped by the model's training context); it is also the
            batch size, since all of one input's tokens go through llama.cpp in one batch.
        n_threads: compute threads (``None``: llama-cpp-python's default).

    Raises:
        ModelFileError: the file is not a usable GGUF.
        ConfigError: the GGUF is a reranker.
    """

    def __init__(self, path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None) -> None:
        summary = inspect_gguf(path)
        self.path = path
        self.model_id = model_id
        self.n_ctx = min(n_ctx, summary.context_length or n_ctx)
        self.pooling, self.pooling_reason = gguf_pooling(path, summary.architecture)
        self._n_threads = n_threads
        self._llm: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    @property
    def n_embd(self) -> int:
        """Vector length (the model's hidden size); 0 before :meth:`load`."""
        return int(self._llm.n_embd()) if self._llm is not None else 0

    def load(self) -> None:
        """Load the weights into an embedding context.

        Raises:
            ModelFileError: llama.cpp rejects the file.
            ModelError: llama-cpp-python is not installed.
        """
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelError("llama-cpp-python is not installed: run scripts/install.sh") from exc
        try:
            llm = Llama(
                model_path=str(self.path),
                embedding=True,
                pooling_type=self.pooling,
                n_ctx=self.n_ctx,
                n_batch=self.n_ctx,
                n_ubatch=self.n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(f"llama.cpp could not load {self.path} for embeddings: {exc}") from exc
        with self._lock:
            self._llm = llm
        log.info("embedding model %s loaded: %d dims, pooling %s", self.model_id, self.n_embd, self.pooling_reason)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the model's own special tokens (BOS/EOS as its vocabulary says)."""
        llm = self._require()
        return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def embed(self, inputs: Sequence[EmbeddingInput]) -> Embeddings:
        """One normalized vector per input (blocking).

        Args:
            inputs: texts, or token-id sequences of this model's vocabulary.

        Returns:
            :class:`Embeddings`, vectors of shape ``(len(inputs), n_embd)``.

        Raises:
            RequestError: an input is empty, longer than ``n_ctx`` tokens, or holds a token id
                outside the vocabulary (the message names ``input[i]``).
            GenerationError: llama.cpp failed.
        """
        llm = self._require()
        token_lists = [self._tokens(llm, i, x) for i, x in enumerate(inputs)]
        with self._lock:
            vectors = [self._embed_one(llm, tokens) for tokens in token_lists]
        return Embeddings(vectors, sum(len(t) for t in token_lists))

    def _tokens(self, llm: Any, i: int, item: EmbeddingInput) -> list[int]:
        where = f"input[{i}]"
        tokens = self.tokenize(item) if isinstance(item, str) else list(item)
        if not tokens:
            raise RequestError(f"invalid parameter '{where}': an input must not be empty", param="input")
        if len(tokens) > self.n_ctx:
            raise RequestError(
                f"invalid parameter '{where}': input is too large: {len(tokens)} tokens; "
                f"the embedding context holds {self.n_ctx}",
                param="input",
            )
        n_vocab = llm.n_vocab()
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise RequestError(
                f"invalid parameter '{where}': token id {bad} is outside the vocabulary (0..{n_vocab - 1})",
                param="input",
            )
        return tokens

    def _embed_one(self, llm: Any, tokens: list[int]) -> list[float]:
        """Decode ``tokens`` as sequence 0 and read its pooled vector (caller holds the lock)."""
        import llama_cpp

        n = len(tokens)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for j, token in enumerate(tokens):
                batch.token[j] = token
                batch.pos[j] = j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = True  # embedding contexts want every token as an output
            batch.n_tokens = n
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            rc = llama_cpp.llama_decode(llm.ctx, batch)
            if rc != 0:
                raise GenerationError(f"llama.cpp failed to embed {n} tokens (llama_decode returned {rc})")
            ptr = llama_cpp.llama_get_embeddings_seq(llm.ctx, 0)
            if not ptr:
                raise GenerationError("llama.cpp returned no pooled embedding")
            vector = [float(x) for x in ptr[: self.n_embd]]
        finally:
            llama_cpp.llama_batch_free(batch)
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return [x / norm for x in vector]

    def _require(self) -> Any:
        if self._llm is None:
            raise ModelError("the embedding model is not loaded")
        return self._llm

    def close(self) -> None:
        """Free the model (waits for an embedding in progress)."""
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
