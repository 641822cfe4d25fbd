"""The inference backend seam: a small ``Protocol`` every engine implements.

A backend is blocking and single-request: :meth:`Backend.generate` runs in a worker thread
(see :mod:`potluck.inference.runner`), yields one :class:`GeneratedToken` per sampled token and
stops when ``cancel`` is set. Implementations: :mod:`potluck.inference.llamacpp` (llama.cpp) and
the tensor-parallel ONNX Runtime engine in :mod:`potluck.sharding`.
"""

from __future__ import annotations

import codecs
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from potluck.routing.request import ChatMessage, SamplingParams
from potluck.routing.route import ModelInfo, TokenLogprob

if TYPE_CHECKING:
    from potluck.inference.gguf_file import GGUFSummary


@dataclass(frozen=True)
class GeneratedToken:
    """One sampled token and the text it completes.

    ``text`` may be empty when the token ends inside a multi-byte UTF-8 character (the bytes
    are emitted with the token that completes it).
    """

    token_id: int
    text: str
    logprob: TokenLogprob | None = None  # set when the request asked for ``logprobs``


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered chat: the prompt text and the stop strings its template implies."""

    prompt: str
    stop: tuple[str, ...] = ()


def model_info(summary: GGUFSummary, model_id: str, n_ctx: int, path: str, **extra: str) -> ModelInfo:
    """The :class:`ModelInfo` of a GGUF served with context ``n_ctx`` (tokens)."""
    return ModelInfo(
        model_id=model_id,
        architecture=summary.architecture,
        n_layers=summary.n_layers,
        n_params=summary.n_params,
        quantization=summary.quantization,
        context_length=summary.context_length,
        n_ctx=n_ctx,
        path=path,
        size_bytes=summary.size_bytes,
        extra=dict(extra),
    )


def seeded(params: SamplingParams, max_tokens: int) -> SamplingParams:
    """``params`` with ``max_tokens`` and a concrete seed (a random one when it had none)."""
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
    return replace(params, max_tokens=max_tokens, seed=seed)


def text_tokens(token_ids: Iterable[int], token_bytes: Callable[[int], bytes]) -> Iterator[GeneratedToken]:
    """Pair each token id with the text it completes, decoding UTF-8 incrementally.

    A character split across tokens comes out whole with the token that completes it; bytes left
    over at the end are flushed as a final ``GeneratedToken(-1, text)`` (not a model token).
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_ids:
        yield GeneratedToken(token, decoder.decode(token_bytes(token)))
    tail = decoder.decode(b"", final=True)
    if tail:
        yield GeneratedToken(-1, tail)


#: ``SamplingParams.grammar`` is applied (constrained sampling).
GRAMMAR = "grammar"
#: ``SamplingParams.logprobs`` is filled in (``GeneratedToken.logprob``).
LOGPROBS = "logprobs"


def backend_features(backend: object) -> frozenset[str]:
    """What optional sampling features ``backend`` implements: its ``features`` attribute
    (a set of :data:`GRAMMAR`, :data:`LOGPROBS`), empty when it declares none."""
    features: frozenset[str] = frozenset(getattr(backend, "features", ()))
    return features


def backend_concurrency(backend: object) -> int:
    """Generations ``backend`` runs at once: its ``max_concurrency`` attribute (batch slots),
    1 when it declares none (single-sequence backends; the runner serializes them)."""
    n = getattr(backend, "max_concurrency", 1)
    return n if isinstance(n, int) and n >= 1 else 1


@runtime_checkable
class Backend(Protocol):
    """A loaded model that can tokenize, template chats and generate.

    ``load`` and ``generate`` block; callers run them off the event loop, one generation at a
    time per instance unless it declares ``max_concurrency`` (:func:`backend_concurrency`).
    """

    @property
    def info(self) -> ModelInfo: ...

    def load(self) -> None:
        """Load the weights. Raises ``ModelFileError`` for an unusable file."""

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``."""

    def render_chat(self, messages: Sequence[ChatMessage], tools: str | None = None) -> ChatPrompt:
        """The prompt for a chat history, from the model's chat template (or a plain fallback);
        ``tools``: JSON text of OpenAI tool definitions (:meth:`potluck.inference.chat.ChatTemplate.render`)."""

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GeneratedToken]:
        """Sample up to ``params.max_tokens`` tokens after ``prompt`` (text, or its token ids from
        :meth:`tokenize` when the caller already has them).

        Stops early at end-of-sequence or when ``cancel`` is set. Stop strings are handled by the
        caller (:class:`potluck.inference.stops.StopMatcher`).

        Raises:
            GenerationError: the engine failed.
            RequestError: the prompt does not fit the context.
        """

    def close(self) -> None:
        """Free the model."""
