"""Conversions between the routing contract and RPC ``generate`` frames, both directions.

Messages (with tool calls), sampling (grammar and logprobs included) and token log-probabilities:
one place, so a field added to the request reaches the peer, or fails loudly in a test here,
rather than being dropped on the way.
"""

from __future__ import annotations

from potluck.overlay.wire import WireLogprob, WireMessage, WireSampling, WireToolCall, WireTopLogprob
from potluck.routing.request import ChatMessage, SamplingParams, ToolCall
from potluck.routing.route import TokenLogprob


def message_to_wire(m: ChatMessage) -> WireMessage:
    return WireMessage(
        role=m.role,
        content=m.content,
        tool_calls=tuple(WireToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls),
        tool_call_id=m.tool_call_id,
        name=m.name,
    )


def message_from_wire(m: WireMessage) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls)
    return ChatMessage(m.role, m.content, tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


def sampling_to_wire(p: SamplingParams, max_tokens: int) -> WireSampling:
    return WireSampling(
        max_tokens=max_tokens,
        temperature=float(p.temperature),
        top_p=float(p.top_p),
        top_k=p.top_k,
        seed=p.seed,
        stop=tuple(p.stop),
        grammar=p.grammar,
        logprobs=p.logprobs,
    )


def sampling_from_wire(p: WireSampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        seed=p.seed,
        stop=tuple(p.stop),
        grammar=p.grammar,
        logprobs=p.logprobs,
    )


def _top(t: TokenLogprob) -> WireTopLogprob:
    return WireTopLogprob(token=t.token, logprob=min(0.0, float(t.logprob)), token_bytes=t.token_bytes)


def logprobs_to_wire(lps: tuple[TokenLogprob, ...]) -> tuple[WireLogprob, ...]:
    return tuple(
        WireLogprob(
            token=t.token,
            logprob=min(0.0, float(t.logprob)),
            token_bytes=t.token_bytes,
            top=tuple(_top(a) for a in t.top),
        )
        for t in lps
    )


def logprobs_from_wire(lps: tuple[WireLogprob, ...]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            t.token, t.logprob, t.token_bytes, tuple(TokenLogprob(a.token, a.logprob, a.token_bytes) for a in t.top)
        )
        for t in lps
    )
