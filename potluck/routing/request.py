"""What a completion request is, independent of where it runs: messages, sampling, the request.

These are the contract types every route, backend and wire format converts to and from
(OpenAI's chat/completions fields, https://platform.openai.com/docs/api-reference/chat).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant message made (OpenAI ``tool_calls[i]``).

    ``arguments`` is the JSON text of the arguments object, as the model wrote it.
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat history.

    ``tool_calls``: the calls an ``assistant`` message made; ``tool_call_id``: the call a ``tool``
    message answers; ``name``: the tool's name on a ``tool`` message (optional).
    """

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters.

    Attributes:
        max_tokens: upper bound on generated tokens.
        temperature: softmax temperature; 0 means greedy (argmax).
        top_p: nucleus-sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 disables.
        seed: RNG seed; ``None`` draws one.
        stop: strings that end generation; they are not included in the output.
        grammar: a GBNF grammar (llama.cpp's grammar format, ``grammars/README.md`` in llama.cpp)
            the output must follow, e.g. from a JSON schema; ``None``: unconstrained. A route that
            cannot apply it refuses the request (HTTP 400 naming the parameter).
        logprobs: ``None``: no log-probabilities; ``k >= 0``: each generated token carries its own
            natural-log probability under the model's unmodified distribution plus the ``k`` most
            likely alternatives (OpenAI ``logprobs``/``top_logprobs``).
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    logprobs: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """A completion request, independent of where it runs.

    Exactly one of ``prompt`` (text completion) and ``messages`` (chat) is set.
    ``headers`` carries per-request options such as ``X-Potluck-Privacy`` (lower-cased keys).
    ``continuation`` is answer text another route already produced: a resumed request continues
    after it (appended to the rendered prompt; ARCHITECTURE.md, "Routing a request").
    ``scopes`` are what the caller's API key allows beyond plain completions (``cloud``,
    ``privacy-override``; :mod:`potluck.routing.scopes`); empty by default (fail closed). The HTTP
    API sets them for every request (:mod:`potluck.node.auth`).
    ``tools`` is the JSON text of OpenAI ``tools`` (an array of ``{"type": "function", "function":
    {...}}``) rendered into a chat prompt through the model's template; ``None``: no tools. Which
    call (if any) the model must make is expressed as ``params.grammar``.
    """

    model: str
    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    continuation: str = ""
    scopes: frozenset[str] = frozenset()
    tools: str | None = None

    def header(self, name: str) -> str | None:
        """Value of a request header (case-insensitive), or ``None``."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)
