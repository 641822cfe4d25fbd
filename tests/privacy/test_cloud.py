"""The cloud client against real aiohttp servers on loopback (retries, refusals, broken streams)."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from potluck.errors import ConnectError, PeerRefused, ProtocolViolation, RequestError, TransferError
from potluck.privacy.cloud import CloudClient, CloudConfig
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams
from potluck.routing.route import Finished, TextDelta
from tests.e2e.procs import free_port

KEY = "sk-test-should-never-be-logged-0123456789"
REQ = GenerationRequest("cloud/m", SamplingParams(max_tokens=5, stop=("\n",)), messages=(ChatMessage("user", "hi"),))


def _sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


@pytest.fixture
async def upstream():
    state = {"calls": 0, "fail_first": 0, "status": 503, "body": None, "auth": []}

    async def chat(request: web.Request) -> web.StreamResponse:
        state["calls"] += 1
        state["auth"].append(request.headers.get("Authorization"))
        state["body"] = await request.json()
        if state["calls"] <= state["fail_first"]:
            return web.Response(status=state["status"], text="busy")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        await resp.write(state.get("stream") or _sse(_delta("Hel"), _delta("lo", "length"), usage))
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}, {"id": "n"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/v1")), state
    finally:
        await server.close()


async def test_stream_usage_and_body(upstream, caplog):
    url, state = upstream
    caplog.set_level(logging.DEBUG)
    async with CloudClient(CloudConfig(url, api_key=KEY)) as client:
        events = [e async for e in client.stream(REQ, "m")]
        assert await client.list_models() == ["m", "n"]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Hel", "lo"]
    assert events[-1] == Finished("length", 3, 2)
    assert state["body"]["model"] == "m" and state["body"]["stream"] is True and state["body"]["stop"] == ["\n"]
    assert state["auth"] == [f"Bearer {KEY}"]
    assert KEY not in caplog.text and KEY not in repr(CloudConfig(url, api_key=KEY))


async def test_retries_then_succeeds(upstream):
    url, state = upstream
    state["fail_first"] = 2
    async with CloudClient(CloudConfig(url, max_retries=2, backoff_s=0.01)) as client:
        events = [e async for e in client.stream(REQ, "m")]
    assert state["calls"] == 3 and isinstance(events[-1], Finished)


async def test_retries_are_bounded(upstream):
    url, state = upstream
    state["fail_first"] = 10
    async with CloudClient(CloudConfig(url, max_retries=1, backoff_s=0.01)) as client:
        with pytest.raises(TransferError):
            [e async for e in client.stream(REQ, "m")]
    assert state["calls"] == 2


@pytest.mark.parametrize(("status", "exc"), [(401, PeerRefused), (403, PeerRefused), (400, RequestError)])
async def test_refusals_are_not_retried(upstream, status, exc):
    url, state = upstream
    state["fail_first"], state["status"] = 10, status
    async with CloudClient(CloudConfig(url, max_retries=3, backoff_s=0.01)) as client:
        with pytest.raises(exc):
            [e async for e in client.stream(REQ, "m")]
    assert state["calls"] == 1


async def test_malformed_event_is_protocol_violation(upstream):
    url, state = upstream
    state["stream"] = b"data: {not json\n\n"
    async with CloudClient(CloudConfig(url)) as client:
        with pytest.raises(ProtocolViolation):
            [e async for e in client.stream(REQ, "m")]


async def test_unreachable_is_connect_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    async with CloudClient(CloudConfig(url, max_retries=1, backoff_s=0.01, connect_timeout_s=2)) as client:
        with pytest.raises(ConnectError):
            [e async for e in client.stream(REQ, "m")]
