"""The tool-call parser (``parse_tool_calls``) and the early stream decision (``may_be_call``)."""

from __future__ import annotations

import json
import re

import pytest

from potluck.node.tool_calls import may_be_call, new_call_id, parse_tool_calls

NAMES = frozenset({"get_weather", "get_time"})


def _args(call) -> object:
    return json.loads(call.arguments)


def test_bare_object_with_arguments_object():
    calls = parse_tool_calls(' {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n', NAMES)
    assert calls is not None and len(calls) == 1
    assert calls[0].name == "get_weather"
    assert _args(calls[0]) == {"city": "Paris", "days": 2}
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)


def test_arguments_as_a_string_are_kept_verbatim():
    calls = parse_tool_calls('{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}', NAMES)
    assert calls is not None and calls[0].arguments == '{"tz": "UTC"}'


def test_parameters_key_and_missing_arguments():
    calls = parse_tool_calls('{"name": "get_time", "parameters": {"tz": "CET"}}', NAMES)
    assert calls is not None and _args(calls[0]) == {"tz": "CET"}
    calls = parse_tool_calls('{"name": "get_time"}', NAMES)
    assert calls is not None and _args(calls[0]) == {}


def test_non_ascii_arguments_stay_readable():
    calls = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Zürich"}}', NAMES)
    assert calls is not None and "Zürich" in calls[0].arguments


def test_json_array_of_several_calls_with_distinct_ids():
    text = json.dumps(
        [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]
    )
    calls = parse_tool_calls(text, NAMES)
    assert calls is not None
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [_args(c) for c in calls] == [{"city": "Oslo"}, {"tz": "UTC"}]
    assert calls[0].id != calls[1].id


def test_tool_call_blocks_several_with_whitespace_between():
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    calls = parse_tool_calls(text, NAMES)
    assert calls is not None and [c.name for c in calls] == ["get_weather", "get_time"]
    assert _args(calls[0]) == {"city": "Rome"}


def test_unclosed_last_block_counts_as_a_call():
    """A reply cut by the block's closing tag as a stop string still parses."""
    calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}', NAMES)
    assert calls is not None and calls[0].name == "get_time"


@pytest.mark.parametrize(
    "text",
    [
        "Sure, let me look. <tool_call>" + '{"name": "get_time", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\nDone, the time is noon.',
        '{"name": "get_time", "arguments": {}} and then some prose',
        'Here: {"name": "get_time", "arguments": {}}',
    ],
)
def test_text_around_a_call_is_a_plain_reply(text):
    assert parse_tool_calls(text, NAMES) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The weather in Paris is sunny.",
        '{"name": "get_weather", "arguments": {"city": "Paris"}',  # unbalanced
        '<tool_call>{"name": "get_weather", "arguments": {</tool_call>',  # broken JSON in a block
        '<tool_call>{"name": "get_weather"}</tool_call><tool_call>not json</tool_call>',
        '{"name": "launch_missiles", "arguments": {}}',  # not one of the request's tools
        '[{"name": "get_time", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]',  # one unknown spoils all
        "[]",
        '["get_time"]',
        '{"arguments": {"city": "Paris"}}',  # no name
        '{"name": 7, "arguments": {}}',
        '"get_time"',
    ],
)
def test_malformed_or_foreign_replies_are_not_calls(text):
    assert parse_tool_calls(text, NAMES) is None


def test_only_the_request_tool_names_count():
    text = '{"name": "get_weather", "arguments": {}}'
    assert parse_tool_calls(text, frozenset()) is None
    assert parse_tool_calls(text, {"get_weather"}) is not None


def test_call_ids_are_fresh():
    assert len({new_call_id() for _ in range(100)}) == 100


@pytest.mark.parametrize(
    ("prefix", "verdict"),
    [
        ("", None),
        ("  \n", None),
        ("<", None),
        ("<tool", None),
        ("  <tool_call", None),
        ("<tool_call>", True),
        ('<tool_call>{"na', True),
        ("{", True),
        ('\n{"name"', True),
        ("[", True),
        ("H", False),
        ("Hello", False),
        ("<b>bold</b>", False),
        ("<tool_x", False),
        ("<tool_callx", False),
        ("Sure. <tool_call>", False),
    ],
)
def test_stream_decision_on_prefixes(prefix, verdict):
    assert may_be_call(prefix) is verdict


def test_decision_once_made_holds_for_every_longer_prefix():
    """A verdict is final: growing the prefix never takes it back (the stream relies on this)."""
    for reply in ['<tool_call>{"name": "get_time"}</tool_call>', "<tool> is not a call", "plain", '  {"a": 1}']:
        verdicts = [may_be_call(reply[:i]) for i in range(len(reply) + 1)]
        decided = [v for v in verdicts if v is not None]
        assert decided and len(set(decided)) == 1, (reply, verdicts)
        first = verdicts.index(decided[0])
        assert all(v is decided[0] for v in verdicts[first:])
