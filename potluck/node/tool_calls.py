"""Tool calls in generated text: find them, and decide early in a stream whether one is coming.

Conventions recognized (the ones chat templates teach their models):

* ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call (Hermes, Qwen
  2.5/3, SmolLM3 templates);
* the whole reply being one JSON object ``{"name": ..., "arguments"|"parameters": {...}}`` or a
  JSON array of them (Llama 3.x templates; potluck's own preamble for templates without tool
  support, :data:`potluck.inference.chat.TOOLS_PREAMBLE`; the grammar of a forced call,
  :func:`potluck.node.structured.tool_grammar`).

Only names of the request's tools count as calls; anything else is plain text.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection
from typing import Any

from potluck.routing.request import ToolCall

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_OPEN = "<tool_call>"


def new_call_id() -> str:
    """An OpenAI-style tool call id (``call_`` + 24 hex digits)."""
    return "call_" + secrets.token_hex(12)


def _call(obj: Any, names: Collection[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(id=new_call_id(), name=str(obj["name"]), arguments=text)


def _calls(objs: list[Any], names: Collection[str]) -> tuple[ToolCall, ...] | None:
    calls = [_call(o, names) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return tuple(c for c in calls if c is not None)


def parse_tool_calls(text: str, names: Collection[str]) -> tuple[ToolCall, ...] | None:
    """The tool calls ``text`` makes, or ``None`` when it is not (only) tool calls.

    Args:
        text: the whole generated reply.
        names: the request's tool names.
    """
    stripped = text.strip()
    if _OPEN in stripped:
        if _BLOCK.sub("", stripped).strip():  # text around the blocks: a reply, not (only) calls
            return None
        try:
            objs = [json.loads(m) for m in _BLOCK.findall(stripped)]
        except ValueError:
            return None
        return _calls(objs, names)
    if not stripped.startswith(("{", "[")):
        return None
    try:
        obj = json.loads(stripped)
    except ValueError:
        return None
    return _calls(obj if isinstance(obj, list) else [obj], names)


def may_be_call(prefix: str) -> bool | None:
    """Whether a reply starting with ``prefix`` may be a tool call: ``True`` (hold the text back
    until the end), ``False`` (plain text: stream it), ``None`` (too early to tell)."""
    stripped = prefix.lstrip()
    if not stripped:
        return None
    if stripped.startswith(("{", "[", _OPEN)):
        return True
    if _OPEN.startswith(stripped):
        return None
    return False
