"""Routes: the places a completion can run, behind one small interface.

A :class:`Route` turns a :class:`GenerationRequest` into a stream of :class:`TextDelta` events
that always ends with exactly one :class:`Finished`. The HTTP API only talks to routes; the
router (:mod:`potluck.routing.router`) picks one per request. Implementations live in the subsystems:
:class:`~potluck.inference.route.LoadedModelRoute` (a model loaded on this node), peer routes
(:mod:`potluck.overlay.peer_routes`), the cloud (:mod:`potluck.privacy.provider`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from potluck.identity import Tier
from potluck.routing.request import FinishReason, GenerationRequest


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is.

    Attributes:
        model_id: the name the API serves it under.
        architecture: GGUF ``general.architecture`` (``llama``, ``qwen2``...).
        n_layers: transformer blocks.
        n_params: parameter count.
        quantization: dominant tensor type (``Q4_0``, ``F16``...).
        context_length: tokens the model was trained for.
        n_ctx: context length this backend instance allows.
        path: file the weights came from.
        size_bytes: file size.
    """

    model_id: str
    architecture: str
    n_layers: int
    n_params: int
    quantization: str
    context_length: int
    n_ctx: int
    path: str
    size_bytes: int
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability (natural log, the model's distribution before sampling).

    ``token`` is the token's text (possibly a partial UTF-8 character, decoded with replacement),
    ``token_bytes`` its raw bytes, ``top`` the most likely alternatives at that position, most
    likely first (empty unless requested). OpenAI's ``logprobs.content[i]`` shape.
    """

    token: str
    logprob: float
    token_bytes: bytes = b""
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New completion text, the number of tokens it came from, and their log-probabilities
    (one entry per token when the request asked for ``logprobs``, else empty)."""

    text: str
    n_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """End of a completion, with OpenAI ``usage`` counts (tokens)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


RouteEvent = TextDelta | Finished


class Route(Protocol):
    """Somewhere a completion can run."""

    @property
    def model_id(self) -> str:
        """The model this route serves."""
        ...

    @property
    def tier(self) -> Tier:
        """The trust tier of where it runs (0 this device .. 3 cloud); tier >= 2 goes through the
        privacy guard (:mod:`potluck.routing.plan`)."""
        ...

    def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        """Yield text deltas, then one ``Finished``.

        Raises:
            RequestError: bad parameters for this model (e.g. prompt longer than the context).
            Overloaded: the destination's queue is full.
            GenerationError / NetworkError: the destination failed.
        """
        ...


class ServedModelRoute(Route, Protocol):
    """A route to a model this node runs itself (tier 0): what it is and how busy it is."""

    @property
    def info(self) -> ModelInfo:
        """The loaded model."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model."""
        ...

    @property
    def active(self) -> int:
        """Generations running now (up to the backend's batch slots)."""
        ...

    @property
    def decode_tps(self) -> float:
        """Single-stream decode tokens/s the engine measured (0: not measured)."""
        ...

    @property
    def kind(self) -> Literal["local", "tp"]:
        """``local``: a model loaded here; ``tp``: a tensor-parallel group this node leads."""
        ...
