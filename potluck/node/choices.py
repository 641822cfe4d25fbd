"""Several choices in one response: OpenAI ``n > 1`` and ``/v1/completions`` prompt arrays.

Each choice is its own :class:`~potluck.routing.request.GenerationRequest` on its own route stream;
they run concurrently (a batching backend decodes them together; a serial one queues them) and
their pieces are merged as they come. Choice indices follow OpenAI: prompt ``p``'s ``j``-th
completion is choice ``p * n + j``. With a fixed ``seed``, copy ``j`` of a prompt samples with
``seed + j``, so the copies differ and each one is reproducible; without one each draws its own.
Streaming interleaves the choices' chunks, each carrying its ``index``; usage counts every prompt's
tokens once and every choice's completion tokens.

Everything that shapes one choice (tool calls, logprobs, the chunk objects) is
:mod:`potluck.node.openai_chat`, the same as for a single choice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from potluck.errors import PotluckError
from potluck.node.dashboard.outbound import RouteObserver
from potluck.node.openai_chat import Calls, Content, Piece, Shaper, ToolMode, pieces
from potluck.routing.request import GenerationRequest, ToolCall
from potluck.routing.route import Finished, TextDelta, TokenLogprob

log = logging.getLogger(__name__)

#: Most choices one request may ask for (``n`` times the number of prompts).
MAX_CHOICES = 16

Opener = Callable[[GenerationRequest], Awaitable[tuple[RouteObserver, AsyncGenerator[TextDelta | Finished, None]]]]


@dataclass(frozen=True)
class Choice:
    """One choice to generate: its request, the prompt it belongs to (for usage) and its echo text."""

    gen: GenerationRequest
    prompt_index: int = 0
    echo: str = ""


def fan_out(gens: Sequence[GenerationRequest], n: int, echoes: Sequence[str] = ()) -> list[Choice]:
    """``n`` choices per request, in OpenAI order; copy ``j`` gets ``seed + j`` when a seed is set."""
    out = []
    for p, gen in enumerate(gens):
        for j in range(n):
            seed = gen.params.seed
            copy = gen if seed is None or j == 0 else replace(gen, params=replace(gen.params, seed=seed + j))
            out.append(Choice(copy, p, echoes[p] if echoes else ""))
    return out


@dataclass
class _Acc:
    """What one choice has produced so far (non-streaming)."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: tuple[ToolCall, ...] = ()
    done: Finished | None = None


@dataclass(frozen=True)
class ChoiceContext:
    """What the API hands this module: how to open a route for a request, how to shape an error,
    and what to count when a client goes away (kept here so this module never imports the API)."""

    open: Opener
    error_json: Callable[[PotluckError], dict[str, Any]]
    on_cancel: Callable[[], None]


async def merged(streams: Sequence[AsyncGenerator[Piece, None]]) -> AsyncGenerator[tuple[int, Piece], None]:
    """Interleave the pieces of several choices as they arrive, tagged with the choice index.

    Ends after every stream's ``Finished``. One pump task per stream, owned here: leaving the
    ``async for`` early (or a failure) cancels and awaits all of them.

    Raises:
        PotluckError: the first error any choice raised (the others are then cancelled).
    """
    queue: asyncio.Queue[tuple[int, Piece | PotluckError]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[Piece, None]) -> None:
        try:
            async with aclosing(stream) as it:
                async for piece in it:
                    await queue.put((i, piece))
        except PotluckError as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s), name=f"choice-{i}") for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, PotluckError):
                raise item
            if isinstance(item, Finished):
                remaining -= 1
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(choices: Sequence[Choice], done: Sequence[Finished | None]) -> dict[str, int]:
    prompt: dict[int, int] = {}
    completion = 0
    for c, d in zip(choices, done, strict=True):
        if d is not None:
            prompt.setdefault(c.prompt_index, d.prompt_tokens)
            completion += d.completion_tokens
    n_prompt = sum(prompt.values())
    return {"prompt_tokens": n_prompt, "completion_tokens": completion, "total_tokens": n_prompt + completion}


def _shapers(chat: bool, model: str, logprobs: bool, n: int) -> list[Shaper]:
    """One shaper per choice (each tracks its own text offset), all under one response id."""
    shapers = [Shaper(chat, model, logprobs=logprobs) for _ in range(n)]
    for s in shapers[1:]:
        s.id, s.created = shapers[0].id, shapers[0].created
    return shapers


def _indexed(obj: dict[str, Any], index: int) -> dict[str, Any]:
    for choice in obj["choices"]:
        choice["index"] = index
    return obj


async def complete_choices(
    request: web.Request,
    ctx: ChoiceContext,
    choices: Sequence[Choice],
    *,
    stream: bool,
    chat: bool,
    include_usage: bool,
    tools: ToolMode | None = None,
) -> web.StreamResponse:
    """Answer one request with ``len(choices)`` choices (see the module docstring).

    Raises:
        PotluckError: before the response starts (unknown model, queue full, bad parameter);
            after it started, errors are sent as a final ``data: {"error": ...}`` event.
    """
    opened = [await ctx.open(c.gen) for c in choices]
    observer = opened[0][0]
    streams = [pieces(events, tools) for _, events in opened]
    logprobs = choices[0].gen.params.logprobs is not None
    shapers = _shapers(chat, observer.route.model_id, logprobs, len(choices))
    if not stream:
        return web.json_response(await _whole(choices, streams, shapers), headers=observer.headers())

    async with aclosing(merged(streams)) as it:
        first = await anext(it)  # early errors (queue full, bad prompt) keep their status code
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        response.headers.update(observer.headers())
        await response.prepare(request)
        try:
            for i, (c, s) in enumerate(zip(choices, shapers, strict=True)):
                await _send(response, _indexed(s.chunk(c.echo if c.echo or chat else None, None, first=True), i))
            done: list[Finished | None] = [None] * len(choices)
            called = [False] * len(choices)
            item: tuple[int, Piece] | None = first
            while item is not None:
                i, piece = item
                s = shapers[i]
                if isinstance(piece, Content):
                    await _send(response, _indexed(s.chunk(piece.text, None, logprobs=piece.logprobs), i))
                elif isinstance(piece, Calls):
                    called[i] = True
                    for chunk in s.call_chunks(piece.calls):
                        await _send(response, _indexed(chunk, i))
                else:
                    done[i] = piece
                    reason = "tool_calls" if called[i] else piece.finish_reason
                    await _send(response, _indexed(s.chunk(None, reason), i))
                item = await anext(it, None)
            if include_usage:
                await _send(response, shapers[0].usage_chunk(_usage(choices, done)))
            await response.write(b"data: [DONE]\n\n")
        except (ClientConnectionResetError, ConnectionResetError):
            ctx.on_cancel()
            log.info("client went away; %d choices cancelled", len(choices))
        except PotluckError as exc:
            log.warning("stream of %d choices failed after it started: %s", len(choices), exc)
            await _send(response, ctx.error_json(exc))
    return response


async def _whole(
    choices: Sequence[Choice], streams: Sequence[AsyncGenerator[Piece, None]], shapers: Sequence[Shaper]
) -> dict[str, Any]:
    acc = [_Acc() for _ in choices]
    async with aclosing(merged(streams)) as it:
        async for i, piece in it:
            if isinstance(piece, Content):
                acc[i].parts.append(piece.text)
                acc[i].logprobs.extend(piece.logprobs)
            elif isinstance(piece, Calls):
                acc[i].calls = piece.calls
            else:
                acc[i].done = piece
    usage = _usage(choices, [a.done for a in acc])
    out: list[dict[str, Any]] = []
    for i, (c, a, s) in enumerate(zip(choices, acc, shapers, strict=True)):
        assert a.done is not None  # merged() ends only after every Finished
        whole = s.whole(c.echo + "".join(a.parts), a.done.finish_reason, usage, a.calls, a.logprobs)
        out.extend(_indexed(whole, i)["choices"])
    body = shapers[0].whole("", "stop", usage)
    body["choices"] = out
    return body


async def _send(response: web.StreamResponse, obj: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
