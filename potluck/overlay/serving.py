"""What this node serves to the swarm: its local routes, load, hardware, and RPC ``generate``.

Requests arriving over RPC run only on this node's *local* routes (never forwarded again, so two
nodes can never bounce a request between them). A resumed request (``continuation`` set) appends
the text another peer already produced to the rendered prompt, so the model continues the same
answer (the ARCHITECTURE's "replay the prompt plus the tokens already produced").

Tokens travel to the peer in batches: every frame crosses from the node's asyncio loop to the
overlay's trio thread and then through msgpack, yamux and Noise, which costs far more than a token of
a small model takes to generate. :meth:`LocalServing.serve` sends the first token at once, then at
most one ``TokenFrame`` per ``flush_interval_s`` holding every token generated since the previous
frame (a model slower than that still gets one frame per token, sent as soon as it is produced).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, suppress

import psutil

from potluck.errors import ModelNotFound
from potluck.overlay.generate_codec import logprobs_to_wire, message_from_wire, sampling_from_wire
from potluck.overlay.state import Hardware, Load, ModelAd
from potluck.overlay.verification.fileid import FileIdentity
from potluck.overlay.wire import FinishFrame, GenerateRequest, TokenFrame
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, RouteEvent, ServedModelRoute, TextDelta, TokenLogprob
from potluck.routing.router import Router
from potluck.tasks import Failure

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.005  # most time a generated token waits for the next TokenFrame to a peer
_MAX_FRAME_TOKENS = 256  # tokens per TokenFrame at most (its text stays far below the frame limit)
_PUMP_QUEUE = 512  # route events buffered between the model and the frames (backpressure beyond)


def to_generation_request(req: GenerateRequest) -> GenerationRequest:
    """Wire request -> the node's request."""
    return GenerationRequest(
        model=req.model,
        params=sampling_from_wire(req.params),
        prompt=req.prompt,
        messages=tuple(message_from_wire(m) for m in req.messages) if req.messages is not None else None,
        headers=tuple(req.headers),
        continuation=req.continuation,
        tools=req.tools,
    )


def _content_fields(file: FileIdentity | None) -> dict[str, object]:
    """A ModelAd's content-address fields (none while the file is not hashed yet)."""
    if file is None:
        return {}
    return {"sha256": file.sha256, "merkle_root": file.merkle_root, "size_bytes": file.size}


def _per_token(delta: TextDelta) -> list[TextDelta]:
    """``delta`` as one delta per token, for pacing: the text is cut into ``n_tokens`` nearly equal
    pieces (the model hands over several tokens at once when the consumer is slower than it). A
    delta with log-probabilities, or of at most one token, stays whole."""
    n = delta.n_tokens
    if n <= 1 or delta.logprobs or len(delta.text) < n:
        return [delta]
    cuts = [round(i * len(delta.text) / n) for i in range(n + 1)]
    return [TextDelta(delta.text[cuts[i] : cuts[i + 1]], 1) for i in range(n)]


class LocalServing:
    """The node's own models, seen from the overlay.

    Args:
        router: the node's router (its local routes are what we serve).
        rate_limit_tps: most tokens per second streamed to peers (0: no cap); a donor node keeps
            its owner's machine usable this way (tokens beyond the cap wait, they are not dropped).
        flush_interval_s: most seconds a token waits to share a ``TokenFrame`` with later ones
            (0: one frame per route event).
    """

    def __init__(
        self,
        router: Router,
        rate_limit_tps: float = 0.0,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        memory_budget: int = 0,
    ) -> None:
        self.router = router
        self.memory_budget = memory_budget  # the configured --memory-budget, advertised in the record
        self.memory_bw = 0.0  # bytes/s, set once the node has measured them (Hardware.memory_bw/disk_bw)
        self.disk_bw = 0.0
        self.rate_limit_tps = rate_limit_tps
        self.flush_interval_s = flush_interval_s
        self.served_tps = 0.0  # exponential moving average over generations served to peers
        # model id -> its file's content address, once hashed (set by the node: Verifier.content_id)
        self.content_id: Callable[[str], FileIdentity | None] = lambda model_id: None

    def _routes(self) -> list[ServedModelRoute]:
        return self.router.local_routes

    @property
    def decode_tps(self) -> float:
        """Decode tokens/s to publish (``Hardware.decode_tps``): the engines' own single-stream
        measurement (the fastest local model's), else the rate of generations served to peers;
        never above ``rate_limit_tps``, the most peers get (routers predict latency from it)."""
        measured = max((r.decode_tps for r in self._routes()), default=0.0) or self.served_tps
        return min(measured, self.rate_limit_tps) if self.rate_limit_tps > 0 and measured else measured

    def model_ads(self) -> list[ModelAd]:
        return [
            ModelAd(  # the content address joins once the file is hashed
                id=r.info.model_id,
                quantization=r.info.quantization[:32],
                n_ctx=r.info.n_ctx,
                n_layers=r.info.n_layers,
                n_params=r.info.n_params,
            ).model_copy(update=_content_fields(self.content_id(r.info.model_id)))
            for r in self._routes()
        ]

    def hardware(self) -> Hardware:
        vm = psutil.virtual_memory()
        return Hardware(
            ram_total=int(vm.total),
            ram_free=int(vm.available),
            cores=os.cpu_count() or 1,
            decode_tps=self.decode_tps,
            memory_budget=self.memory_budget,
            memory_bw=self.memory_bw,
            disk_bw=self.disk_bw,
        )

    def load(self) -> Load:
        routes = self._routes()
        return Load(queue_depth=sum(r.queue_depth for r in routes), active=sum(r.active for r in routes))

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
        # The route runs in a pump task owned by this generator (cancelled and awaited when it ends),
        # so the frame side can wait for the flush interval without cancelling the model's stream.
        events: asyncio.Queue[RouteEvent | Failure] = asyncio.Queue(_PUMP_QUEUE)
        ended = asyncio.Event()  # the pump queued its last event: flush without waiting further
        pump = asyncio.ensure_future(self._pump(route, gen, events, ended))
        try:
            async with aclosing(self._frames(events, ended)) as frames:
                async for frame in frames:
                    yield frame
        finally:
            pump.cancel()
            await asyncio.wait([pump])  # our own cancellation still propagates from here

    async def _pump(
        self,
        route: ServedModelRoute,
        gen: GenerationRequest,
        events: asyncio.Queue[RouteEvent | Failure],
        ended: asyncio.Event,
    ) -> None:
        """Run ``gen`` on ``route`` into ``events`` (rate limit and decode speed accounted here)."""
        t0, n = time.perf_counter(), 0
        paced_from: float | None = None  # the cap paces tokens from the first one: a slow first token earns no burst
        try:
            async for event in route.stream(gen):
                if isinstance(event, TextDelta) and self.rate_limit_tps > 0:
                    for piece in _per_token(event):  # paced token by token, not in the model's bursts
                        n += piece.n_tokens
                        if paced_from is None:
                            paced_from = time.perf_counter() - piece.n_tokens / self.rate_limit_tps
                        await asyncio.sleep(max(0.0, paced_from + n / self.rate_limit_tps - time.perf_counter()))
                        await events.put(piece)
                    continue
                if isinstance(event, TextDelta):
                    n += event.n_tokens
                elif isinstance(event, Finished):
                    elapsed = time.perf_counter() - t0
                    if n >= 8 and elapsed > 0:
                        tps = n / elapsed
                        self.served_tps = tps if self.served_tps == 0 else 0.8 * self.served_tps + 0.2 * tps
                await events.put(event)
        except Exception as exc:  # handed to the frame side, which raises it after the tokens before it
            await events.put(Failure(exc))
        ended.set()

    async def _frames(
        self, events: asyncio.Queue[RouteEvent | Failure], ended: asyncio.Event
    ) -> AsyncGenerator[TokenFrame | FinishFrame, None]:
        """Coalesce route events into frames: the first token at once, then every token generated
        during ``flush_interval_s`` in one ``TokenFrame``; the ``FinishFrame`` last."""
        texts: list[str] = []
        lps: list[TokenLogprob] = []
        n_tokens = 0
        last_flush = -math.inf
        loop = asyncio.get_running_loop()
        while True:
            item = await events.get()  # nothing is held while waiting here
            while True:
                if isinstance(item, TextDelta):
                    texts.append(item.text)
                    lps.extend(item.logprobs)
                    n_tokens += item.n_tokens
                elif isinstance(item, Finished):
                    if texts:
                        yield TokenFrame(text="".join(texts), n_tokens=n_tokens, logprobs=logprobs_to_wire(tuple(lps)))
                    yield FinishFrame(
                        finish_reason=item.finish_reason,
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,
                    )
                    return
                elif isinstance(item, Failure):
                    if texts:
                        yield TokenFrame(text="".join(texts), n_tokens=n_tokens, logprobs=logprobs_to_wire(tuple(lps)))
                    item.reraise()
                if n_tokens >= _MAX_FRAME_TOKENS:
                    break
                try:
                    item = events.get_nowait()  # drain what the model has ready
                    continue
                except asyncio.QueueEmpty:
                    pass
                wait = last_flush + self.flush_interval_s - loop.time()
                if wait <= 0:
                    break
                with suppress(TimeoutError):  # the pump keeps queueing meanwhile
                    async with asyncio.timeout(wait):
                        await ended.wait()
                try:
                    item = events.get_nowait()
                except asyncio.QueueEmpty:
                    break
            last_flush = loop.time()
            yield TokenFrame(text="".join(texts), n_tokens=n_tokens, logprobs=logprobs_to_wire(tuple(lps)))
            texts, lps, n_tokens = [], [], 0
