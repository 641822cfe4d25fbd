"""The generate codec: routing request <-> RPC frames round trip through real msgpack encoding, and
oversized or garbage fields are refused with an error that names the field."""

from __future__ import annotations

import math

import msgpack
import pytest

from potluck.errors import ProtocolViolation
from potluck.overlay.generate_codec import (
    logprobs_from_wire,
    logprobs_to_wire,
    message_from_wire,
    message_to_wire,
    sampling_from_wire,
    sampling_to_wire,
)
from potluck.overlay.wire import GenerateRequest, TokenFrame, decode_payload, encode
from potluck.routing.request import ChatMessage, SamplingParams, ToolCall
from potluck.routing.route import TokenLogprob

GRAMMAR = 'root ::= "{" space "}"\nspace ::= " "?'
MESSAGES = (
    ChatMessage("system", "Use tools."),
    ChatMessage("user", "Weather in Zürich?"),
    ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Zürich"}'),)),
    ChatMessage("tool", '{"temp": 3}', tool_call_id="call_1", name="get_weather"),
)
TOOLS = '[{"type": "function", "function": {"name": "get_weather"}}]'


def _roundtrip(frame):
    """Through the bytes a peer actually sees (length prefix dropped)."""
    return decode_payload(encode(frame)[4:])


def _payload(frame, **changes) -> bytes:
    """``frame``'s msgpack payload with fields replaced (what a hostile or buggy peer could send)."""
    obj = _mutable(frame.model_dump(mode="python"))
    for path, value in changes.items():
        target = obj
        *head, last = path.split("__")
        for key in head:
            target = target[int(key)] if isinstance(target, (list, tuple)) else target[key]
        target[last] = value
    return msgpack.packb(obj, use_bin_type=True)


def _mutable(obj):
    if isinstance(obj, dict):
        return {k: _mutable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mutable(v) for v in obj]
    return obj


def _request(params: SamplingParams, **fields) -> GenerateRequest:
    base = {"model": "m", "params": sampling_to_wire(params, params.max_tokens)}
    return GenerateRequest(**(base | fields))


def test_request_round_trip_keeps_grammar_logprobs_tools_and_tool_messages():
    params = SamplingParams(
        max_tokens=32, temperature=0.0, top_p=0.9, top_k=40, seed=7, stop=("\n",), grammar=GRAMMAR, logprobs=5
    )
    wire = _request(params, messages=tuple(message_to_wire(m) for m in MESSAGES), tools=TOOLS)
    back = _roundtrip(wire)
    assert isinstance(back, GenerateRequest)
    assert sampling_from_wire(back.params) == params
    assert tuple(message_from_wire(m) for m in back.messages or ()) == MESSAGES
    assert back.tools == TOOLS


def test_logprobs_zero_and_none_stay_apart():
    for k in (None, 0):
        params = SamplingParams(max_tokens=4, logprobs=k)
        back = _roundtrip(_request(params, prompt="hi"))
        assert sampling_from_wire(back.params).logprobs == k


def test_token_logprobs_round_trip():
    lps = (
        TokenLogprob("é", -0.25, "é".encode(), (TokenLogprob("é", -0.25, "é".encode()), TokenLogprob("e", -1.5, b"e"))),
        TokenLogprob("\ufffd", -3.0, b"\xe2\x82", ()),  # a partial UTF-8 piece keeps its bytes
    )
    back = _roundtrip(TokenFrame(text="é", n_tokens=2, logprobs=logprobs_to_wire(lps)))
    assert isinstance(back, TokenFrame)
    assert logprobs_from_wire(back.logprobs) == lps


def test_rounding_above_zero_is_clamped_on_the_way_out():
    """A log-probability of a certain token may round to a hair above 0; the sender clamps it."""
    (w,) = logprobs_to_wire((TokenLogprob("a", 1e-12, b"a", (TokenLogprob("a", 1e-12, b"a"),)),))
    assert w.logprob == 0.0 and w.top[0].logprob == 0.0


GOOD = _request(SamplingParams(max_tokens=4, grammar=GRAMMAR, logprobs=2), prompt="hi")
GOOD_TOKENS = TokenFrame(
    text="a", n_tokens=1, logprobs=logprobs_to_wire((TokenLogprob("a", -0.1, b"a", (TokenLogprob("a", -0.1, b"a"),)),))
)


@pytest.mark.parametrize(
    ("frame", "changes", "field"),
    [
        (GOOD, {"params__grammar": "x" * ((256 << 10) + 1)}, "params.grammar"),
        (GOOD, {"params__grammar": 5}, "params.grammar"),
        (GOOD, {"params__logprobs": 21}, "params.logprobs"),
        (GOOD, {"params__logprobs": -1}, "params.logprobs"),
        (GOOD, {"params__logprobs": "5"}, "params.logprobs"),
        (GOOD, {"params__surprise": True}, "params.surprise"),
        (GOOD, {"tools": ["not", "text"]}, "tools"),
        (GOOD, {"tools": "x" * ((256 << 10) + 1)}, "tools"),
        (GOOD_TOKENS, {"logprobs__0__logprob": 0.5}, "logprobs.0.logprob"),
        (GOOD_TOKENS, {"logprobs__0__token_bytes": "text, not bytes"}, "logprobs.0.token_bytes"),
        (GOOD_TOKENS, {"logprobs__0__top": [{"token": "a", "logprob": -1.0}] * 21}, "logprobs.0.top"),
        (GOOD_TOKENS, {"logprobs__0__token": "t" * 1025}, "logprobs.0.token"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(frame, changes, field):
    with pytest.raises(ProtocolViolation, match="invalid frame") as info:
        decode_payload(_payload(frame, **changes))
    assert f".{field}: " in str(info.value)


def test_tool_call_messages_are_bounded():
    call = {"id": "c", "name": "f", "arguments": "{}"}
    msg = {"role": "assistant", "content": "", "tool_calls": [call] * 65, "tool_call_id": None, "name": None}
    with pytest.raises(ProtocolViolation, match=r"messages\.0\.tool_calls"):
        decode_payload(_payload(GOOD, prompt=None, messages=[msg]))
    msg = {**msg, "tool_calls": [{**call, "id": "i" * 257}]}
    with pytest.raises(ProtocolViolation, match=r"messages\.0\.tool_calls\.0\.id"):
        decode_payload(_payload(GOOD, prompt=None, messages=[msg]))


def test_a_frame_over_the_size_limit_is_refused_when_encoded():
    """Each field within its bound, the frame as a whole over 1 MiB: refused before it is sent."""
    n = 250 << 10
    params = SamplingParams(max_tokens=4, grammar="g" * n)
    big = _request(params, prompt="p" * n, continuation="c" * n, tools="t" * n)
    big = big.model_copy(update={"messages": (message_to_wire(ChatMessage("user", "u" * n)),)})
    with pytest.raises(ProtocolViolation, match=r"GenerateRequest frame of \d+ bytes exceeds the 1048576-byte limit"):
        encode(big)


@pytest.mark.parametrize("payload", [b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"t": "generate"})])
def test_garbage_is_a_protocol_violation(payload):
    with pytest.raises(ProtocolViolation):
        decode_payload(payload)


def test_non_finite_logprob_is_not_silently_positive():
    (w,) = logprobs_to_wire((TokenLogprob("a", -math.inf, b"a"),))
    back = _roundtrip(TokenFrame(text="a", n_tokens=1, logprobs=(w,)))
    assert isinstance(back, TokenFrame) and back.logprobs[0].logprob == -math.inf
