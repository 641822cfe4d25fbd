"""Routes: the places a completion can run, behind one small interface.

A :class:`Route` turns a :class:`GenerationRequest` into a stream of :class:`TextDelta` events
that always ends with exactly one :class:`Finished`. The HTTP API only talks to routes; the
router (:mod:`potluck.node.router`) picks one per request. Implementations: :class:`LocalRoute`
(a model loaded on this node); peers and the cloud add their own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import Protocol

from potluck.errors import RequestError
from potluck.inference.backend import ChatMessage, FinishReason, ModelInfo, SamplingParams
from potluck.inference.runner import ModelRunner
from potluck.inference.stops import StopMatcher


@dataclass(frozen=True)
class GenerationRequest:
    """A completion request, independent of where it runs.

    Exactly one of ``prompt`` (text completion) and ``messages`` (chat) is set.
    ``headers`` carries per-request options such as ``X-Potluck-Privacy`` (lower-cased keys).
    """

    model: str
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """Value of a request header (case-insensitive), or ``None``."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True)
class TextDelta:
    """New completion text and the number of tokens it came from."""

    text: str
    n_tokens: int


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

    def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        """Yield text deltas, then one ``Finished``.

        Raises:
            RequestError: bad parameters for this model (e.g. prompt longer than the context).
            Overloaded: the destination's queue is full.
            GenerationError / NetworkError: the destination failed.
        """
        ...


class LocalRoute:
    """A model loaded on this node, run through its :class:`ModelRunner`."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @property
    def info(self) -> ModelInfo:
        return self.runner.backend.info

    @property
    def model_id(self) -> str:
        return self.info.model_id

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        backend = self.runner.backend
        params = request.params
        if request.messages is not None:
            chat = backend.render_chat(request.messages)
            prompt, stops = chat.prompt, tuple(dict.fromkeys(params.stop + chat.stop))
        else:
            prompt, stops = request.prompt or "", params.stop
        prompt_ids = await self.runner.run_blocking(backend.tokenize, prompt)
        n_prompt = len(prompt_ids)
        room = self.info.n_ctx - n_prompt
        if room <= 0:
            raise RequestError(
                f"prompt is {n_prompt} tokens but the context holds {self.info.n_ctx}; shorten it"
            )
        params = replace(params, max_tokens=min(params.max_tokens, room), stop=stops)
        matcher = StopMatcher(stops)
        n_done = 0
        async for batch in self.runner.stream(prompt_ids, params):  # tokenized once, above
            n_done += sum(1 for t in batch if t.token_id >= 0)
            text = matcher.feed("".join(t.text for t in batch))
            if text:
                yield TextDelta(text, len(batch))
            if matcher.stopped:
                break
        tail = matcher.flush()
        if tail:
            yield TextDelta(tail, 0)
        reason: FinishReason = "length" if n_done >= params.max_tokens and not matcher.stopped else "stop"
        yield Finished(reason, n_prompt, n_done)
