"""potluck.openai_stream: one OpenAI SSE line at a time."""

from __future__ import annotations

import pytest

from potluck.errors import ProtocolViolation
from potluck.openai_stream import DONE, Chunk, parse_line


def test_chat_text_usage_error_and_done() -> None:
    assert parse_line(b'data: {"choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]}\n') == Chunk("Hi")
    assert parse_line('data:{"choices": [{"text": "x", "finish_reason": "length"}]}') == Chunk("x", "length")
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    assert parse_line(f'data: {{"choices": [], "usage": {usage}}}'.replace("'", '"')) == Chunk(usage=usage)
    assert parse_line(b'data: {"error": {"message": "boom"}}') == Chunk(error="boom")
    assert parse_line(b"data: [DONE]\r\n") is DONE


@pytest.mark.parametrize("line", [b"", b": keep-alive", b"event: message", b"id: 3"])
def test_lines_without_events(line: bytes) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize("line", [b"data: {not json", b"data: [1]", b'data: {"choices": [{"delta": null}]}'])
def test_malformed_events(line: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_line(line)
