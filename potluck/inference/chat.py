"""Chat templates: the GGUF's own Jinja template, or a plain fallback for models without one.

The GGUF key ``tokenizer.chat_template`` holds a Jinja2 template in the Hugging Face
``apply_chat_template`` convention; it is rendered with llama-cpp-python's ``Jinja2ChatFormatter``
(https://llama-cpp-python.readthedocs.io, "Chat Completion"), so every backend turns a chat history
into exactly the prompt llama.cpp would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from potluck.inference.backend import ChatPrompt
from potluck.routing.request import ChatMessage

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_plain_chat(messages: Sequence[ChatMessage]) -> ChatPrompt:
    """The fallback template: ``Role: content`` lines, ending with ``Assistant:``."""
    lines = [f"{PLAIN_ROLES[m.role]}: {m.content}" for m in messages]
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
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)

    def render(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        """The prompt for ``messages`` and the stop strings the template implies."""
        if self._formatter is None:
            return render_plain_chat(messages)
        result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return ChatPrompt(prompt=result.prompt, stop=tuple(s for s in stop if s))
