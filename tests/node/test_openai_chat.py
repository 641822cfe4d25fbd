"""Route events -> OpenAI pieces (``pieces``): text streams at once unless it may open a tool call,
which is held to the end and sent as ``Calls`` or as content; logprobs travel with their text."""

from __future__ import annotations

import json

from potluck.node.openai_chat import Calls, Content, Shaper, ToolMode, chat_logprobs, collect, pieces
from potluck.routing.request import ToolCall
from potluck.routing.route import Finished, TextDelta, TokenLogprob

AUTO = ToolMode(frozenset({"get_time"}))
FORCED = ToolMode(frozenset({"get_time"}), forced=True)
CALL = '{"name": "get_time", "arguments": {"tz": "UTC"}}'


def _lp(text: str) -> TokenLogprob:
    return TokenLogprob(text, -0.5, text.encode())


async def _trace(parts: list[str], mode: ToolMode | None) -> list[tuple[int, object]]:
    """Each piece with the number of route events consumed when it came out."""
    fed = 0

    async def events():
        nonlocal fed
        for p in parts:
            fed += 1
            yield TextDelta(p, 1, (_lp(p),))
        fed += 1
        yield Finished("stop", 3, len(parts))

    return [(fed, piece) async for piece in pieces(events(), mode)]


async def test_plain_text_streams_as_soon_as_it_cannot_be_a_call():
    out = await _trace(["He", "llo", " there"], AUTO)
    assert [(n, p.text) for n, p in out if isinstance(p, Content)] == [(1, "He"), (2, "llo"), (3, " there")]
    assert isinstance(out[-1][1], Finished)


async def test_undecided_prefix_is_held_then_released_whole():
    out = await _trace(["  ", "<to", "ol>", " rest"], AUTO)
    contents = [(n, p) for n, p in out if isinstance(p, Content)]
    assert contents[0][0] == 3 and contents[0][1].text == "  <tool>"  # decided at the third event
    assert [lp.token for lp in contents[0][1].logprobs] == ["  ", "<to", "ol>"]
    assert contents[1] == (4, Content(" rest", (_lp(" rest"),)))


async def test_a_call_is_held_to_the_end_and_sent_as_calls():
    parts = [CALL[:5], CALL[5:20], CALL[20:]]
    out = await _trace(parts, AUTO)
    kinds = [type(p) for _, p in out]
    assert kinds == [Calls, Finished]
    assert out[0][0] == len(parts) + 1  # only after the route finished
    call = out[0][1].calls[0]
    assert call.name == "get_time" and json.loads(call.arguments) == {"tz": "UTC"}


async def test_tool_call_block_split_across_tokens():
    text = f"<tool_call>{CALL}</tool_call>"
    out = await _trace([text[i : i + 3] for i in range(0, len(text), 3)], AUTO)
    assert [type(p) for _, p in out] == [Calls, Finished]


async def test_json_that_is_not_a_call_comes_out_as_content_at_the_end():
    out = await _trace(['{"answer"', ": 42}"], AUTO)
    assert [type(p) for _, p in out] == [Content, Finished]
    assert out[0][1].text == '{"answer": 42}'
    assert [lp.token for lp in out[0][1].logprobs] == ['{"answer"', ": 42}"]


async def test_forced_mode_holds_even_plain_text():
    out = await _trace(["Hel", "lo"], FORCED)
    assert [(n, type(p)) for n, p in out] == [(3, Content), (3, Finished)]
    assert out[0][1].text == "Hello"


async def test_without_tools_nothing_is_held_or_parsed():
    out = await _trace([CALL], None)
    assert out[0] == (1, Content(CALL, (_lp(CALL),)))


async def test_collect_returns_calls_text_logprobs_and_finish():
    async def events():
        yield TextDelta(CALL, 4, (_lp("x"),))
        yield Finished("stop", 2, 4)

    text, calls, lps, done = await collect(pieces(events(), AUTO))
    assert text == "" and calls[0].name == "get_time" and lps == [] and done.completion_tokens == 4


def test_whole_chat_response_with_calls_is_openai_shaped():
    calls = (ToolCall("call_1", "get_time", "{}"),)
    obj = Shaper(chat=True, model="m").whole("", "stop", {"total_tokens": 1}, calls=calls)
    choice = obj["choices"][0]
    assert obj["object"] == "chat.completion" and choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
    }


def test_call_chunks_carry_id_and_name_then_arguments():
    chunks = Shaper(chat=True, model="m").call_chunks((ToolCall("call_a", "get_time", '{"tz": "UTC"}'),))
    deltas = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks]
    assert deltas[0] == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"tz": "UTC"}'}}


def test_chat_logprobs_shape():
    t = TokenLogprob("a", -0.1, b"a", (TokenLogprob("a", -0.1, b"a"), TokenLogprob("b", -2.5, b"b")))
    assert chat_logprobs([t]) == {
        "content": [
            {
                "token": "a",
                "logprob": -0.1,
                "bytes": [97],
                "top_logprobs": [
                    {"token": "a", "logprob": -0.1, "bytes": [97]},
                    {"token": "b", "logprob": -2.5, "bytes": [98]},
                ],
            }
        ],
        "refusal": None,
    }
