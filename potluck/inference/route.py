"""The route to a model loaded on this node: render, tokenize, run, stop-match, count usage."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Literal

from potluck.errors import RequestError
from potluck.identity import Tier
from potluck.inference.backend import GRAMMAR, LOGPROBS, backend_features
from potluck.inference.runner import ModelRunner
from potluck.inference.stops import StopMatcher
from potluck.routing.request import FinishReason, GenerationRequest
from potluck.routing.route import Finished, ModelInfo, RouteEvent, TextDelta


class LoadedModelRoute:
    """A model loaded on this node, run through its :class:`ModelRunner` (a :class:`ServedModelRoute`)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    @property
    def info(self) -> ModelInfo:
        return self.runner.backend.info

    @property
    def model_id(self) -> str:
        return self.info.model_id

    tier = Tier.LOCAL

    @property
    def kind(self) -> Literal["local", "tp"]:
        """``tp`` when the backend is a tensor-parallel group this node leads."""
        return "tp" if getattr(self.runner.backend, "group", None) is not None else "local"

    @property
    def features(self) -> frozenset[str]:
        """Optional sampling features the backend applies (``grammar``, ``logprobs``)."""
        return backend_features(self.runner.backend)

    def check(self, request: GenerationRequest) -> None:
        """Refuse what the backend cannot apply, naming it (never a silent drop).

        Raises:
            RequestError: ``grammar`` (``response_format``, or a required/named ``tool_choice``)
                or ``logprobs`` on a backend without that feature.
        """
        have = self.features
        name = self.info.extra.get("backend", type(self.runner.backend).__name__)
        if request.params.grammar is not None and GRAMMAR not in have:
            raise RequestError(
                f"the {name} backend serving {self.model_id!r} cannot constrain output with a grammar "
                "(response_format, or tool_choice 'required' / a named function)",
                param="response_format",
            )
        if request.params.logprobs is not None and LOGPROBS not in have:
            raise RequestError(
                f"'logprobs': the {name} backend serving {self.model_id!r} does not report token log-probabilities",
                param="logprobs",
            )

    @property
    def queue_depth(self) -> int:
        return self.runner.queue_depth

    @property
    def active(self) -> int:
        return self.runner.active

    @property
    def decode_tps(self) -> float:
        """The backend's measured single-stream decode tokens/s (0 when it measures none)."""
        tps = getattr(self.runner.backend, "decode_tps", 0.0)
        return float(tps) if isinstance(tps, (int, float)) else 0.0

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        self.check(request)
        backend = self.runner.backend
        params = request.params
        if request.tools is not None and request.messages is None:
            raise RequestError("tools need a chat request (messages)", param="tools")
        if request.messages is not None:
            chat = backend.render_chat(request.messages, request.tools)
            prompt, stops = chat.prompt, tuple(dict.fromkeys(params.stop + chat.stop))
        else:
            prompt, stops = request.prompt or "", params.stop
        prompt += request.continuation
        prompt_ids = await self.runner.run_blocking(backend.tokenize, prompt)
        n_prompt = len(prompt_ids)
        room = self.info.n_ctx - n_prompt
        if room <= 0:
            raise RequestError(f"prompt is {n_prompt} tokens but the context holds {self.info.n_ctx}; shorten it")
        params = replace(params, max_tokens=min(params.max_tokens, room), stop=stops)
        matcher = StopMatcher(stops)
        n_done = 0
        async for batch in self.runner.stream(prompt_ids, params):  # tokenized once, above
            n_done += sum(1 for t in batch if t.token_id >= 0)
            text = matcher.feed("".join(t.text for t in batch))
            logprobs = tuple(t.logprob for t in batch if t.logprob is not None)
            if text or logprobs:
                yield TextDelta(text, len(batch), logprobs)
            if matcher.stopped:
                break
        tail = matcher.flush()
        if tail:
            yield TextDelta(tail, 0)
        reason: FinishReason = "length" if n_done >= params.max_tokens and not matcher.stopped else "stop"
        yield Finished(reason, n_prompt, n_done)
