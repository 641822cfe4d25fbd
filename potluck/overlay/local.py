"""What this node serves to the swarm: its local routes, load, hardware, and RPC ``generate``.

Requests arriving over RPC run only on this node's *local* routes (never forwarded again, so two
nodes can never bounce a request between them). A resumed request (``continuation`` set) appends
the text another peer already produced to the rendered prompt, so the model continues the same
answer (the ARCHITECTURE's "replay the prompt plus the tokens already produced").
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import psutil

from potluck.errors import ModelNotFound
from potluck.inference.backend import ChatMessage, SamplingParams
from potluck.node.router import Router
from potluck.node.routes import Finished, GenerationRequest, LocalRoute, TextDelta
from potluck.overlay.state import Hardware, Load, ModelAd
from potluck.overlay.wire import FinishFrame, GenerateRequest, TokenFrame

log = logging.getLogger(__name__)


def to_generation_request(req: GenerateRequest) -> GenerationRequest:
    """Wire request -> the node's request (without the continuation)."""
    p = req.params
    return GenerationRequest(
        model=req.model,
        params=SamplingParams(p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, tuple(p.stop)),
        prompt=req.prompt,
        messages=tuple(ChatMessage(m.role, m.content) for m in req.messages) if req.messages is not None else None,
        headers=tuple(req.headers),
    )


class LocalServing:
    """The node's own models, seen from the overlay.

    Args:
        router: the node's router (its local routes are what we serve).
        rate_limit_tps: most tokens per second streamed to peers (0: no cap); a donor node keeps
            its owner's machine usable this way (tokens beyond the cap wait, they are not dropped).
    """

    def __init__(self, router: Router, rate_limit_tps: float = 0.0) -> None:
        self.router = router
        self.rate_limit_tps = rate_limit_tps
        self.decode_tps = 0.0  # exponential moving average over served generations

    def _routes(self) -> list[LocalRoute]:
        return [r for r in self.router.local_routes if isinstance(r, LocalRoute)]

    def model_ads(self) -> list[ModelAd]:
        return [
            ModelAd(
                id=r.info.model_id,
                quantization=r.info.quantization[:32],
                n_ctx=r.info.n_ctx,
                n_layers=r.info.n_layers,
                n_params=r.info.n_params,
            )
            for r in self._routes()
        ]

    def hardware(self) -> Hardware:
        vm = psutil.virtual_memory()
        return Hardware(
            ram_total=int(vm.total),
            ram_free=int(vm.available),
            cores=os.cpu_count() or 1,
            decode_tps=self.decode_tps,
        )

    def load(self) -> Load:
        routes = self._routes()
        return Load(queue_depth=sum(r.runner.queue_depth for r in routes), active=sum(r.runner.active for r in routes))

    async def serve(self, req: GenerateRequest) -> AsyncIterator[TokenFrame | FinishFrame]:
        """Run ``req`` on the local route of its model.

        Raises:
            ModelNotFound: this node does not serve ``req.model``.
            RequestError / Overloaded / GenerationError: from the local route.
        """
        route = next((r for r in self._routes() if r.model_id == req.model), None)
        if route is None:
            raise ModelNotFound(f"model {req.model!r} is not served by this node")
        gen = to_generation_request(req)
        log.info("serving %s for a peer%s", req.model, " (resumed)" if req.continuation else "")
        if req.continuation:
            if gen.messages is not None:
                chat = route.runner.backend.render_chat(gen.messages)
                stops = tuple(dict.fromkeys(gen.params.stop + chat.stop))
                gen = replace(
                    gen,
                    prompt=chat.prompt + req.continuation,
                    messages=None,
                    params=replace(gen.params, stop=stops),
                )
            else:
                gen = replace(gen, prompt=(gen.prompt or "") + req.continuation)
        t0, n = time.perf_counter(), 0
        async for event in route.stream(gen):
            if isinstance(event, TextDelta):
                n += event.n_tokens
                if self.rate_limit_tps > 0:
                    await asyncio.sleep(max(0.0, t0 + n / self.rate_limit_tps - time.perf_counter()))
                yield TokenFrame(text=event.text, n_tokens=event.n_tokens)
            elif isinstance(event, Finished):
                elapsed = time.perf_counter() - t0
                if n >= 8 and elapsed > 0:
                    tps = n / elapsed
                    self.decode_tps = tps if self.decode_tps == 0 else 0.8 * self.decode_tps + 0.2 * tps
                yield FinishFrame(
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                )
