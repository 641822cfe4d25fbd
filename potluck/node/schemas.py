"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Field names and ranges follow OpenAI's API reference (https://platform.openai.com/docs/api-reference/chat).
Values out of range are a 400, and so is any parameter potluck does not know (``extra="forbid"``:
a 400 naming it, never a silent drop). Accepted although they change nothing here, because
clients commonly send them: ``user``, ``metadata``, ``store``, ``service_tier``,
``parallel_tool_calls`` (at most one forced call is made either way), and ``frequency_penalty``,
``presence_penalty`` = 0, ``logit_bias`` empty, ``best_of`` = 1, ``suffix`` empty (other values are a
400). In messages, fields the API itself returns (``refusal``, ``annotations``, ``audio``,
``function_call`` null) are accepted so a client can send a reply back as history.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from potluck.node.structured import ResponseFormat, ToolChoice, ToolDef
from potluck.routing.request import ChatMessage, SamplingParams, ToolCall

MAX_STOP = 4
MAX_CHOICES = 16  # n times the number of prompts (potluck.node.choices.MAX_CHOICES)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    include_usage: bool = False


class _CompletionBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1  # choices (potluck.node.choices)
    # Accepted, no effect here (see the module docstring).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return v

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(s for s in stop if s),
        )


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["text"]
    text: str


class _FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """An assistant message's ``tool_calls[i]`` in the history."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: _FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Returned by the API and echoed back by clients; carry nothing for the model.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None

    def to_message(self) -> ChatMessage:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        role = "system" if self.role == "developer" else self.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(role=role, content=content, tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name)


class ChatCompletionRequest(_CompletionBase):
    """``POST /v1/chat/completions`` body."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDef], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @property
    def logprobs_k(self) -> int | None:
        """``SamplingParams.logprobs``: ``None`` unless ``logprobs`` is true."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_CompletionBase):
    """``POST /v1/completions`` body."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Literal[1] | None = None
    suffix: Literal[""] | None = None

    @field_validator("prompt")
    @classmethod
    def _text_prompts(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("at least one prompt is needed")
        if isinstance(v, list) and any(not isinstance(p, str) for p in v):
            raise ValueError("token-array prompts are not supported; send the prompt as text (or a list of texts)")
        return v

    @property
    def prompt_texts(self) -> list[str]:
        """The prompts, one per group of ``n`` choices."""
        return [self.prompt] if isinstance(self.prompt, str) else [str(p) for p in self.prompt]

    @property
    def prompt_text(self) -> str:
        return self.prompt_texts[0]
