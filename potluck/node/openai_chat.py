"""OpenAI response shapes for chat and text completions: content, tool calls, logprobs.

A route's events (:class:`~potluck.routing.route.TextDelta`, :class:`~potluck.routing.route.Finished`)
become :class:`Content` and :class:`Calls` pieces (:func:`pieces`), which :class:`Shaper` turns
into ``chat.completion`` / ``chat.completion.chunk`` / ``text_completion`` objects
(https://platform.openai.com/docs/api-reference/chat/object).

With tools (``tool_choice`` ``auto``), text that may open a tool call (``{``, ``[``,
``<tool_call>``, :func:`potluck.node.tool_calls.may_be_call`) is held back until the reply ends and
then sent either as ``tool_calls`` (``finish_reason: "tool_calls"``) or as content; other text
streams as it comes. A forced call (``required`` or a named function) is always held back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from potluck.node.tool_calls import may_be_call, parse_tool_calls
from potluck.routing.request import ToolCall
from potluck.routing.route import Finished, TextDelta, TokenLogprob


@dataclass(frozen=True)
class ToolMode:
    """How to read a reply for tool calls: the request's tool names; ``forced``: a call was required."""

    names: frozenset[str]
    forced: bool = False


@dataclass(frozen=True)
class Content:
    """Reply text to send, with the log-probabilities of the tokens it came from."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Calls:
    """The reply was tool calls (sent instead of content, ``finish_reason: "tool_calls"``)."""

    calls: tuple[ToolCall, ...]


Piece = Content | Calls | Finished


async def pieces(
    events: AsyncGenerator[TextDelta | Finished, None], tools: ToolMode | None
) -> AsyncGenerator[Piece, None]:
    """Route events -> pieces, detecting tool calls (see the module docstring). Ends with ``Finished``;
    closing it closes ``events``."""
    async with aclosing(events) as it:
        async for piece in _pieces(it, tools):
            yield piece


async def _pieces(events: AsyncIterator[TextDelta | Finished], tools: ToolMode | None) -> AsyncGenerator[Piece, None]:
    held: list[str] = []
    held_lp: list[TokenLogprob] = []
    holding = tools is not None and tools.forced
    deciding = tools is not None and not holding
    async for event in events:
        if isinstance(event, TextDelta):
            if not (holding or deciding):
                yield Content(event.text, event.logprobs)
                continue
            held.append(event.text)
            held_lp.extend(event.logprobs)
            if deciding:
                verdict = may_be_call("".join(held))
                if verdict is not None:
                    deciding, holding = False, verdict
                    if not verdict:
                        yield Content("".join(held), tuple(held_lp))
                        held, held_lp = [], []
            continue
        text = "".join(held)
        calls = parse_tool_calls(text, tools.names) if tools is not None and (holding or deciding) else None
        if calls:
            yield Calls(calls)
        elif text or held_lp:
            yield Content(text, tuple(held_lp))
        yield event
        return


def chat_logprobs(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat ``choices[i].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def one(t: TokenLogprob, top: bool) -> dict[str, Any]:
        d: dict[str, Any] = {"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)}
        if top:
            d["top_logprobs"] = [one(a, False) for a in t.top]
        return d

    return {"content": [one(t, True) for t in logprobs], "refusal": None}


def completion_logprobs(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI legacy completions ``choices[i].logprobs``: parallel ``tokens``, ``token_logprobs``,
    ``top_logprobs`` (token -> logprob maps) and ``text_offset`` (characters, from ``offset``)."""
    offsets = []
    for t in logprobs:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in logprobs],
        "text_offset": offsets,
    }


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class Shaper:
    """Builds OpenAI response objects for chat (``chat.completion``) or text (``text_completion``).

    Args:
        chat: chat completions (else legacy text completions).
        model: the model id to report.
        logprobs: the request asked for log-probabilities (``choices[i].logprobs`` is then filled).
    """

    def __init__(self, chat: bool, model: str, logprobs: bool = False) -> None:
        self.chat = chat
        self.model = model
        self.logprobs = logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self._offset = 0  # characters of text sent so far (completions' text_offset)

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def _logprobs(self, lps: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(lps)
        out = completion_logprobs(lps, self._offset)
        return out

    def chunk(
        self, text: str | None, finish: str | None, first: bool = False, logprobs: tuple[TokenLogprob, ...] = ()
    ) -> dict[str, Any]:
        """One streaming chunk: ``text`` (``None``: no content field), a finish reason, the role on the first."""
        lp = self._logprobs(logprobs) if logprobs else None
        self._offset += len(text or "")
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return self._envelope("text_completion", [choice])

    def call_chunks(self, calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
        """Streaming ``delta.tool_calls``: per call, one chunk with id and name, one with the arguments."""
        out = []
        for i, c in enumerate(calls):
            head = {"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
            for part in (head, {"index": i, "function": {"arguments": c.arguments}}):
                choice = {"index": 0, "delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}
                out.append(self._envelope("chat.completion.chunk", [choice]))
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        obj["usage"] = usage
        return obj

    def whole(
        self,
        text: str,
        finish: str,
        usage: dict[str, int],
        calls: tuple[ToolCall, ...] = (),
        logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob] = (),
    ) -> dict[str, Any]:
        """The non-streaming response object."""
        lp = self._logprobs(logprobs)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text if not calls else (text or None)}
            if calls:
                message["tool_calls"] = [tool_call_json(c) for c in calls]
                finish = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
            obj = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            obj = self._envelope("text_completion", [choice])
        obj["usage"] = usage
        return obj


async def collect(
    events: AsyncGenerator[Piece, None],
) -> tuple[str, tuple[ToolCall, ...], list[TokenLogprob], Finished]:
    """Drain pieces: the whole text, the tool calls (if any), every token's logprobs, the finish."""
    parts: list[str] = []
    lps: list[TokenLogprob] = []
    calls: tuple[ToolCall, ...] = ()
    async with aclosing(events) as it:
        async for piece in it:
            if isinstance(piece, Content):
                parts.append(piece.text)
                lps.extend(piece.logprobs)
            elif isinstance(piece, Calls):
                calls = piece.calls
            else:
                return "".join(parts), calls, lps, piece
    raise AssertionError("a route's events end with Finished")
