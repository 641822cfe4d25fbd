"""OpenAI-compatible upstream client (the "cloud", tier 3) on aiohttp.

Speaks ``POST {base_url}/chat/completions`` and ``/completions`` with ``stream: true`` and reads
the server-sent events with :mod:`potluck.openai_stream` (``data: {...}`` lines, ``data: [DONE]``).
``GET {base_url}/models`` lists the upstream models.

Deadlines: ``connect_timeout_s`` to connect, ``read_timeout_s`` between two reads of the stream,
``total_timeout_s`` for the whole request. Retries (:mod:`potluck.retry`): at most ``max_retries``
more attempts, none starting past ``total_timeout_s``, with capped exponential backoff from
``backoff_s`` (jittered, at most ``MAX_BACKOFF_S``), and only *before* any response byte was
accepted (connection errors, HTTP 408/429/5xx); once the stream has started a failure is a
:class:`~potluck.errors.TransferError`. The API key is sent as ``Authorization: Bearer`` and never
logged or shown in ``repr``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

from potluck.errors import (
    ClosedError,
    ConnectError,
    GenerationError,
    PeerRefused,
    ProtocolViolation,
    RequestError,
    TransferError,
)
from potluck.openai_stream import Done, parse_line
from potluck.retry import Backoff, RetryPolicy
from potluck.routing.request import FinishReason, GenerationRequest
from potluck.routing.route import Finished, RouteEvent, TextDelta

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 30.0  # cap on one wait between attempts
MAX_LINE_BYTES = 1 << 20  # one SSE line; larger is a protocol violation


@dataclass(frozen=True)
class CloudConfig:
    """Where and how to reach the upstream.

    Attributes:
        base_url: API root including the version, e.g. ``https://api.example.com/v1``.
        api_key: bearer token, or ``None`` for servers without auth (never logged).
        connect_timeout_s / read_timeout_s / total_timeout_s: deadlines in seconds.
        max_retries: extra attempts before the stream starts.
        backoff_s: first retry delay; doubles per retry (jittered, capped at ``MAX_BACKOFF_S``).
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    total_timeout_s: float = 600.0
    max_retries: int = 2
    backoff_s: float = 0.5


def request_body(request: GenerationRequest, upstream_model: str) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body for ``request`` (OpenAI chat or text completion).

    Raises:
        RequestError: the request needs a feature this client does not forward upstream (a
            grammar from ``response_format``/``tool_choice``, ``logprobs``, ``tools``), naming it.
    """
    p = request.params
    for param, present in (
        ("response_format", p.grammar is not None),
        ("logprobs", p.logprobs is not None),
        ("tools", request.tools is not None or any(m.tool_calls for m in request.messages or ())),
    ):
        if present:
            raise RequestError(f"'{param}' is not supported on the cloud route", param=param)
    body: dict[str, Any] = {
        "model": upstream_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
    }
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        return "/chat/completions", body
    body["prompt"] = request.prompt or ""
    return "/completions", body


class _RetryableStatus(Exception):
    """An HTTP status worth another attempt (408, 429, 5xx); a ``TransferError`` once retries run out."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _finish(reason: object) -> FinishReason:
    return "length" if reason == "length" else "stop"


class CloudClient:
    """An aiohttp session to one upstream (async context manager; closes the session on exit)."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CloudClient:
        c = self.config
        timeout = aiohttp.ClientTimeout(
            total=c.total_timeout_s, connect=c.connect_timeout_s, sock_read=c.read_timeout_s
        )
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        self._session = aiohttp.ClientSession(timeout=timeout, headers=headers, read_bufsize=MAX_LINE_BYTES)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, path: str) -> str:
        return self.config.base_url.rstrip("/") + path

    async def _open(self, method: str, path: str, body: dict[str, Any] | None) -> aiohttp.ClientResponse:
        """Send with bounded retries; returns a 200 response whose body is not yet read.

        Raises:
            ConnectError: could not reach the upstream (after retries).
            PeerRefused: HTTP 401/403 (bad or missing API key).
            RequestError: another HTTP 4xx (the upstream rejected the request).
            TransferError: HTTP 5xx after retries.
        """
        if self._session is None:
            raise ClosedError("the cloud client is not open")
        c = self.config
        policy = RetryPolicy(
            Backoff(first_s=c.backoff_s, max_s=MAX_BACKOFF_S),
            attempts=c.max_retries + 1,
            deadline_s=c.total_timeout_s,
            retry_on=(ConnectError, _RetryableStatus),
        )
        try:
            async for attempt in policy.async_retrying(log, "the cloud upstream request"):
                with attempt:
                    try:
                        resp = await self._session.request(method, self._url(path), json=body)
                    except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                        raise ConnectError(
                            f"cannot reach the cloud upstream {c.base_url}: {type(exc).__name__}"
                        ) from exc
                    if resp.status == 200:
                        return resp
                    detail = (await resp.text())[:300]
                    resp.release()
                    if resp.status in (401, 403):
                        raise PeerRefused(f"the cloud upstream refused the API key (HTTP {resp.status})")
                    if resp.status not in _RETRY_STATUS:
                        raise RequestError(f"the cloud upstream rejected the request (HTTP {resp.status}): {detail}")
                    raise _RetryableStatus(resp.status)
        except _RetryableStatus as exc:
            raise TransferError(
                f"the cloud upstream failed (HTTP {exc.status}) after {attempt.retry_state.attempt_number} tries"
            ) from exc
        raise AssertionError("unreachable")

    async def list_models(self) -> list[str]:
        """Model ids the upstream serves (``GET /models``)."""
        resp = await self._open("GET", "/models", None)
        try:
            data = await resp.json()
            return [str(m["id"]) for m in data["data"]]
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            raise ProtocolViolation(f"malformed /models answer from the cloud upstream: {exc}") from exc
        finally:
            resp.release()

    async def stream(self, request: GenerationRequest, upstream_model: str) -> AsyncGenerator[RouteEvent, None]:
        """Run ``request`` upstream; yields text deltas and one ``Finished``.

        Raises:
            ConnectError / PeerRefused / RequestError / TransferError: see :meth:`_open`.
            TransferError: the stream broke or stalled past ``read_timeout_s``.
            ProtocolViolation: an event was not valid OpenAI JSON or a line was too long.
            GenerationError: the upstream sent an error event mid-stream.
        """
        path, body = request_body(request, upstream_model)
        resp = await self._open("POST", path, body)
        n_deltas = 0
        reason: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async for raw in resp.content:
                chunk = parse_line(raw)
                if chunk is None:
                    continue  # comments, event:/id: fields, blank separators
                if isinstance(chunk, Done):
                    break
                if chunk.error is not None:
                    raise GenerationError(f"the cloud upstream failed mid-stream: {chunk.error}")
                usage = chunk.usage or usage
                reason = chunk.finish_reason or reason
                if chunk.text:
                    n_deltas += 1
                    yield TextDelta(chunk.text, 1)
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise TransferError(f"the cloud stream broke: {type(exc).__name__}") from exc
        except ValueError as exc:  # aiohttp: line longer than the read buffer
            raise ProtocolViolation(f"oversized line from the cloud upstream: {exc}") from exc
        finally:
            resp.release()
        prompt_tokens = int(usage.get("prompt_tokens", 0)) if isinstance(usage, dict) else 0
        completion_tokens = int(usage.get("completion_tokens", n_deltas)) if isinstance(usage, dict) else n_deltas
        yield Finished(_finish(reason), prompt_tokens, completion_tokens)
