"""The route to a model loaded on this node: render, tokenize, run, stop-match, count usage."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import replace

from potluck.errors import RequestError
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

    @property
    def queue_depth(self) -> int:
        return self.runner.queue_depth

    @property
    def active(self) -> int:
        return self.runner.active

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        backend = self.runner.backend
        params = request.params
        if request.messages is not None:
            chat = backend.render_chat(request.messages)
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
            if text:
                yield TextDelta(text, len(batch))
            if matcher.stopped:
                break
        tail = matcher.flush()
        if tail:
            yield TextDelta(tail, 0)
        reason: FinishReason = "length" if n_done >= params.max_tokens and not matcher.stopped else "stop"
        yield Finished(reason, n_prompt, n_done)
