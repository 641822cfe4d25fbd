"""Reading an OpenAI-style completion stream: one server-sent event per ``data:`` line.

The OpenAI API streams chat and text completions as server-sent events (OpenAI API reference,
"Streaming"; the SSE format is the HTML Living Standard's, section 9.2 "Server-sent events")::

    data: {"choices": [{"delta": {"content": "Hel"}, "finish_reason": null}]}
    data: {"choices": [{"text": "lo", "finish_reason": "length"}], "usage": {...}}
    data: [DONE]

Every OpenAI-compatible server potluck talks to sends one JSON object per ``data:`` line, so events
are read line by line; ``event:``/``id:`` fields, comments and blank separators carry nothing here.
An ``{"error": {"message": ...}}`` event is how a server (potluck's own API among them) reports a
failure after the stream has started. Only the first choice is read (potluck never asks for
``n > 1``).

This is a contract module: the privacy subsystem's cloud client and the CLI's client both read
streams with it, and it does no I/O (callers feed it the lines they read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from potluck.errors import ProtocolViolation

__all__ = ["DONE", "Chunk", "Done", "parse_line"]


@dataclass(frozen=True)
class Chunk:
    """One event of the stream.

    Attributes:
        text: new text of the first choice (chat ``delta.content`` or completion ``text``), or ``None``.
        finish_reason: the first choice's ``finish_reason`` when it has one (``"stop"``, ``"length"``...).
        usage: the ``usage`` object (``prompt_tokens``, ``completion_tokens``) when the event has one.
        error: the message of an error event, else ``None``.
    """

    text: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None


class Done:
    """The ``data: [DONE]`` line: the stream is complete."""

    def __repr__(self) -> str:
        return "DONE"


DONE: Final = Done()


def parse_line(line: bytes | str) -> Chunk | Done | None:
    """Read one line of a completion stream.

    Args:
        line: one line as read from the response, with or without its line ending. Bytes are
            decoded as UTF-8 with replacement characters (as SSE decoding does).

    Returns:
        ``None`` for a line without an event (comment, ``event:``/``id:`` field, blank separator),
        :data:`DONE` for ``data: [DONE]``, else the event as a :class:`Chunk`.

    Raises:
        ProtocolViolation: the ``data:`` payload is not a completion chunk (not JSON, wrong types).
    """
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("data:"):
        return None
    data = text[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        event = json.loads(data)
        error = event.get("error")
        if error is not None:
            return Chunk(error=str(error.get("message") if isinstance(error, dict) else error))
        usage = event.get("usage")
        choices = event.get("choices") or []
        piece = reason = None
        if choices:
            choice = choices[0]
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            reason = choice.get("finish_reason")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProtocolViolation(f"malformed stream event: {exc}") from exc
    return Chunk(
        text=str(piece) if piece else None,
        finish_reason=str(reason) if reason else None,
        usage=usage if isinstance(usage, dict) and usage else None,
    )
