"""Chat templates: the GGUF's own Jinja template, or a plain fallback for models without one.

The GGUF key ``tokenizer.chat_template`` holds a Jinja2 template in the Hugging Face
``apply_chat_template`` convention; it is rendered with llama-cpp-python's ``Jinja2ChatFormatter``
(https://llama-cpp-python.readthedocs.io, "Chat Completion"), so every backend turns a chat history
into exactly the prompt llama.cpp would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from potluck.inference.backend import ChatPrompt
from potluck.routing.request import ChatMessage, ToolCall

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}

# For templates that do not take ``tools``: the definitions go into the system message with the
# reply convention potluck's tool-call parser reads (potluck.node.tool_calls), as llama.cpp's
# "generic" tool format does (common/chat.cpp).
TOOLS_PREAMBLE = (
    "You can call the following tools. To call one, reply with only a JSON object of the form "
    '{"name": <tool name>, "arguments": <arguments object>} and nothing else.\n'
    "Tools: "
)


def _call_text(calls: Sequence[ToolCall]) -> str:
    return "\n".join(json.dumps({"name": c.name, "arguments": _arguments(c.arguments)}) for c in calls)


def _arguments(text: str) -> Any:
    """A call's arguments as an object for templates (they ``tojson`` them); the raw text if not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def inline_tools(messages: Sequence[ChatMessage], tools: str | None) -> list[ChatMessage]:
    """``messages`` for a template without tool support: tool definitions in the system message,
    assistant tool calls as their JSON text."""
    out = [
        ChatMessage(m.role, (m.content + "\n" if m.content else "") + _call_text(m.tool_calls)) if m.tool_calls else m
        for m in messages
    ]
    if tools:
        preamble = TOOLS_PREAMBLE + tools
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", out[0].content + "\n\n" + preamble)
        else:
            out.insert(0, ChatMessage("system", preamble))
    return out


def _template_message(m: ChatMessage) -> dict[str, Any]:
    """The Hugging Face chat-template form of a message (OpenAI's fields)."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        d["name"] = m.name
    return d


def render_plain_chat(messages: Sequence[ChatMessage], tools: str | None = None) -> ChatPrompt:
    """The fallback template: ``Role: content`` lines, ending with ``Assistant:`` (``tools``:
    JSON text of OpenAI tool definitions, described in the system message)."""
    lines = [f"{PLAIN_ROLES[m.role]}: {m.content}" for m in inline_tools(messages, tools)]
    prompt = "\n".join([*lines, "Assistant:"])
    return ChatPrompt(prompt=prompt, stop=("\nUser:", "\nSystem:"))


class ChatTemplate:
    """Renders chat histories for one model.

    Args:
        template: the GGUF's ``tokenizer.chat_template``, or ``None`` for the plain fallback.
        bos_token: text of the model's BOS token (templates may write it).
        eos_token: text of the model's EOS token (templates end turns with it; it becomes a stop).
    """

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self._formatter: Any = None
        # Hugging Face templates that support tools read a ``tools`` variable.
        self.takes_tools = bool(template) and "tools" in (template or "")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)

    def render(self, messages: Sequence[ChatMessage], tools: str | None = None) -> ChatPrompt:
        """The prompt for ``messages`` and the stop strings the template implies.

        ``tools`` (JSON text of OpenAI tool definitions) goes to the template's ``tools`` variable
        when it has one, else into the system message (:func:`inline_tools`).
        """
        if self._formatter is None:
            return render_plain_chat(messages, tools)
        if self.takes_tools:
            kwargs: dict[str, Any] = {"tools": json.loads(tools)} if tools else {}
            result = self._formatter(messages=[_template_message(m) for m in messages], **kwargs)
        else:
            result = self._formatter(messages=[_template_message(m) for m in inline_tools(messages, tools)])
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return ChatPrompt(prompt=result.prompt, stop=tuple(s for s in stop if s))
