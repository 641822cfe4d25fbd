"""``POST /v1/responses``: OpenAI's Responses API, the basic text subset.

https://platform.openai.com/docs/api-reference/responses. Supported: ``input`` as a string or a
list of items (messages with text content, ``function_call`` and ``function_call_output`` items for
tool round trips), ``instructions`` (a system message first), ``max_output_tokens``,
``temperature``, ``top_p``, ``stream``, ``tools`` (function tools, flat form) with ``tool_choice``,
and ``text.format`` (``text``, ``json_object``, ``json_schema``: grammar-enforced as in chat).
Nothing is stored: ``store`` is accepted, ``previous_response_id`` and any other parameter are a
400 naming it.

Streaming sends server-sent events with an ``event:`` line each: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` ..., ``response.output_text.done``, ``response.content_part.done``,
``response.output_item.done`` (or, for a tool call, the ``function_call`` item with
``response.function_call_arguments.delta``/``.done``), then ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from pydantic import BaseModel, ConfigDict, Field

from potluck.errors import PotluckError, RequestError
from potluck.node.openai_chat import Calls, Content, ToolMode, collect, pieces
from potluck.node.structured import (
    FunctionDef,
    JsonSchemaSpec,
    NamedToolChoice,
    ResponseFormat,
    ToolChoice,
    ToolDef,
    _NamedFunction,
    response_format_grammar,
    tool_grammar,
    tools_json,
)
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams, ToolCall
from potluck.routing.route import Finished, TextDelta

log = logging.getLogger(__name__)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TextContent(_Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[_TextContent]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str
    id: str | None = None
    status: str | None = None


class FunctionTool(_Strict):
    """A Responses function tool (flat: ``name`` and ``parameters`` at the top)."""

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _NamedChoice(_Strict):
    type: Literal["function"]
    name: str


class _Format(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class _TextOptions(_Strict):
    format: _Format | None = None


class ResponsesRequest(_Strict):
    """``POST /v1/responses`` body."""

    model: str | None = None
    input: str | Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutput], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stream: bool = False
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedChoice | None = None
    parallel_tool_calls: bool | None = None
    text: _TextOptions | None = None
    # Accepted, no effect here.
    store: bool | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class Generation:
    """What the handler needs from the chat API (:mod:`potluck.node.api` passes it in)."""

    open_route: Callable[..., Awaitable[tuple[Any, AsyncGenerator[TextDelta | Finished, None]]]]
    parse: Callable[[web.Request, type[BaseModel]], Awaitable[Any]]
    headers: Callable[[web.Request], tuple[tuple[str, str], ...]]
    default_max_tokens: Callable[[web.Request], int]


GENERATION = web.AppKey("responses_generation", Generation)


def add_routes(app: web.Application, generation: Generation) -> None:
    """Register ``POST /v1/responses`` on ``app``."""
    app[GENERATION] = generation
    app.router.add_post("/v1/responses", create_response)


def to_messages(body: ResponsesRequest) -> list[ChatMessage]:
    """The chat history of a Responses ``input`` (with ``instructions`` as the system message)."""
    out: list[ChatMessage] = [ChatMessage("system", body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        return [*out, ChatMessage("user", body.input)]
    for item in body.input:
        if isinstance(item, InputMessage):
            text = item.content if isinstance(item.content, str) else "".join(c.text for c in item.content)
            out.append(ChatMessage("system" if item.role == "developer" else item.role, text))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            if out and out[-1].role == "assistant" and out[-1].tool_calls:
                out[-1] = replace(out[-1], tool_calls=(*out[-1].tool_calls, call))
            else:
                out.append(ChatMessage("assistant", "", tool_calls=(call,)))
        else:
            out.append(ChatMessage("tool", item.output, tool_call_id=item.call_id))
    return out


def _tools(body: ResponsesRequest) -> tuple[list[ToolDef] | None, ToolChoice | None]:
    tools = [
        ToolDef(type="function", function=FunctionDef(name=t.name, description=t.description, parameters=t.parameters))
        for t in body.tools or ()
    ] or None
    choice: ToolChoice | None
    if isinstance(body.tool_choice, _NamedChoice):
        choice = NamedToolChoice(type="function", function=_NamedFunction(name=body.tool_choice.name))
    else:
        choice = body.tool_choice
    return tools, choice


def _format(body: ResponsesRequest) -> ResponseFormat | None:
    f = body.text.format if body.text is not None else None
    if f is None:
        return None
    spec = JsonSchemaSpec(name=f.name or "response", schema=f.schema_ or {}, strict=f.strict)
    return ResponseFormat(type=f.type, json_schema=spec if f.type == "json_schema" else None)


class _Shape:
    """Builds the ``response`` object and its output items."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body = body
        self.model = model
        self.id = "resp_" + secrets.token_hex(16)
        self.msg_id = "msg_" + secrets.token_hex(16)
        self.created = int(time.time())

    def message(self, text: str, status: str = "completed") -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" or text else []
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    @staticmethod
    def call(c: ToolCall, status: str = "completed") -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": "fc_" + c.id.removeprefix("call_"),
            "call_id": c.id,
            "name": c.name,
            "arguments": c.arguments if status == "completed" else "",
            "status": status,
        }

    def response(self, status: str, output: list[dict[str, Any]], done: Finished | None = None) -> dict[str, Any]:
        b = self.body
        usage = None
        if done is not None:
            usage = {
                "input_tokens": done.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": done.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            }
        fmt = (
            b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {"type": "text"}
        )
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls if b.parallel_tool_calls is not None else True,
            "temperature": b.temperature,
            "top_p": b.top_p,
            "tool_choice": b.tool_choice.model_dump()
            if isinstance(b.tool_choice, BaseModel)
            else b.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or ()],
            "text": {"format": fmt},
            "store": False,
            "metadata": b.metadata or {},
            "usage": usage,
        }


async def create_response(request: web.Request) -> web.StreamResponse:
    g = request.app[GENERATION]
    body: ResponsesRequest = await g.parse(request, ResponsesRequest)
    tools, choice = _tools(body)
    fmt_grammar = response_format_grammar(_format(body), "text.format")
    call_grammar = tool_grammar(tools, choice)
    if fmt_grammar is not None and call_grammar is not None:
        raise RequestError("'text.format' cannot be combined with a forced 'tool_choice'", param="text.format")
    params = SamplingParams(
        max_tokens=body.max_output_tokens or g.default_max_tokens(request),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=0,
        grammar=fmt_grammar or call_grammar,
    )
    gen = GenerationRequest(
        model=body.model or "",
        params=params,
        messages=tuple(to_messages(body)),
        headers=g.headers(request),
        tools=tools_json(tools, choice),
    )
    grammar_param = "tool_choice" if call_grammar is not None else "text.format"
    observer, raw = await g.open_route(request, gen, grammar_param)
    mode = (
        ToolMode(frozenset(t.function.name for t in tools), call_grammar is not None) if gen.tools and tools else None
    )
    events = pieces(raw, mode)
    shape = _Shape(body, observer.route.model_id)
    if not body.stream:
        text, calls, _, done = await collect(events)
        output = [shape.call(c) for c in calls] if calls else [shape.message(text)]
        status = "incomplete" if done.finish_reason == "length" and not calls else "completed"
        return web.json_response(shape.response(status, output, done), headers=observer.headers())
    return await _stream(request, shape, events, observer.headers())


class _Events:
    """Writes ``event:``/``data:`` pairs with increasing ``sequence_number``s."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
        self.seq = 0

    async def send(self, type_: str, **fields: Any) -> None:
        obj = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        data = json.dumps(obj, ensure_ascii=False)
        await self.response.write(f"event: {type_}\ndata: {data}\n\n".encode())


async def _stream(
    request: web.Request, shape: _Shape, events: AsyncGenerator[Any, None], headers: dict[str, str]
) -> web.StreamResponse:
    async with aclosing(events) as it:
        first = await anext(it)  # early errors keep their status code
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        response.headers.update(headers)
        await response.prepare(request)
        out = _Events(response)
        try:
            await out.send("response.created", response=shape.response("in_progress", []))
            await out.send("response.in_progress", response=shape.response("in_progress", []))
            await _stream_body(out, shape, first, it)
        except (ClientConnectionResetError, ConnectionResetError):
            log.info("client went away; response cancelled")
        except PotluckError as exc:
            log.warning("response stream failed after it started: %s", exc)
            await out.send("error", code=None, message=str(exc), param=getattr(exc, "param", None))
    return response


async def _stream_body(out: _Events, shape: _Shape, event: Any, it: AsyncGenerator[Any, None]) -> None:
    text: list[str] = []
    started = False
    output: list[dict[str, Any]] = []
    while True:
        if isinstance(event, Content):
            if not started:
                started = True
                await out.send("response.output_item.added", output_index=0, item=shape.message("", "in_progress"))
                part = {"type": "output_text", "text": "", "annotations": []}
                await out.send(
                    "response.content_part.added", item_id=shape.msg_id, output_index=0, content_index=0, part=part
                )
            if event.text:
                text.append(event.text)
                await out.send(
                    "response.output_text.delta",
                    item_id=shape.msg_id,
                    output_index=0,
                    content_index=0,
                    delta=event.text,
                )
        elif isinstance(event, Calls):
            for i, c in enumerate(event.calls):
                item = shape.call(c)
                await out.send("response.output_item.added", output_index=i, item=shape.call(c, "in_progress"))
                await out.send(
                    "response.function_call_arguments.delta", item_id=item["id"], output_index=i, delta=c.arguments
                )
                await out.send(
                    "response.function_call_arguments.done", item_id=item["id"], output_index=i, arguments=c.arguments
                )
                await out.send("response.output_item.done", output_index=i, item=item)
                output.append(item)
        else:
            if not output:
                whole = "".join(text)
                if started:
                    part = {"type": "output_text", "text": whole, "annotations": []}
                    common = {"item_id": shape.msg_id, "output_index": 0, "content_index": 0}
                    await out.send("response.output_text.done", text=whole, **common)
                    await out.send("response.content_part.done", part=part, **common)
                else:
                    await out.send("response.output_item.added", output_index=0, item=shape.message("", "in_progress"))
                msg = shape.message(whole)
                await out.send("response.output_item.done", output_index=0, item=msg)
                output.append(msg)
            status = "incomplete" if event.finish_reason == "length" and output[0]["type"] == "message" else "completed"
            await out.send(f"response.{status}", response=shape.response(status, output, event))
            return
        event = await anext(it)
