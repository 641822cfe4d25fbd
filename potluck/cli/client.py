"""A small blocking client for a node's HTTP API, used by the CLI (stdlib ``urllib`` only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from potluck.errors import PotluckError, ProtocolViolation
from potluck.openai_stream import Done, parse_line

TIMEOUT_S = 600.0


class ClientError(PotluckError):
    """The node could not be reached or answered with an error."""


def _authorize(req: urllib.request.Request, api_key: str | None) -> urllib.request.Request:
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    return req


def _open(req: urllib.request.Request, timeout: float) -> Any:
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ClientError(f"node answered {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(
            f"cannot reach a node at {req.full_url} ({reason}); is `potluck node start` running?"
        ) from exc


def get_json(url: str, timeout: float = 10.0, api_key: str | None = None) -> Any:
    """GET ``url`` and decode its JSON body (``api_key``: sent as ``Authorization: Bearer``).

    Raises:
        ClientError: unreachable, HTTP error, or not JSON.
    """
    with _open(_authorize(urllib.request.Request(url), api_key), timeout) as resp:
        try:
            return json.loads(resp.read())
        except ValueError as exc:
            raise ClientError(f"{url} did not return JSON") from exc


def stream_chat(
    base_url: str,
    messages: list[dict[str, str]],
    model: str | None,
    max_tokens: int,
    temperature: float,
    api_key: str | None = None,
) -> Iterator[str]:
    """Stream a chat completion; yields text pieces as they arrive (``api_key``: sent as Bearer).

    Raises:
        ClientError: unreachable, HTTP error, a malformed stream or an error event mid-stream.
    """
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    if model:
        body["model"] = model
    req = urllib.request.Request(
        base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _open(_authorize(req, api_key), TIMEOUT_S) as resp:
        for raw in resp:
            try:
                chunk = parse_line(raw)
            except ProtocolViolation as exc:
                raise ClientError(f"the node sent a malformed stream: {exc}") from exc
            if chunk is None:
                continue
            if isinstance(chunk, Done):
                return
            if chunk.error is not None:
                raise ClientError(f"generation failed: {chunk.error}")
            if chunk.text:
                yield chunk.text
