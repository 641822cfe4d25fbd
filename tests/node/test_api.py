"""HTTP behaviour of the OpenAI-compatible API, in front of the scripted backend (no llama.cpp).

Validation errors and status codes, SSE framing, stop sequences split across tokens, queueing,
client disconnects. The scripted model is byte-level (one token per byte of its reply), so every
expected text and token count is exact. What depends on a real model is in test_api_llamacpp.py.
"""

from __future__ import annotations

import asyncio

import pytest

from potluck.inference.chat import render_plain_chat
from potluck.inference.scripted import ScriptedBackend
from potluck.routing.request import ChatMessage
from tests.helpers import until_async
from tests.node.conftest import sse_events


def chat_body(content: str = "Hi", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


async def test_completion_stream_framing(scripted_api):
    async with scripted_api(ScriptedBackend(reply="Hello, world!", repeat=False)) as api:
        body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
        async with api.http.post("/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert {c["id"] for c in events[:-1]} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == "scripted" for c in events[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}  # the reply ended (EOS)
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 13, "total_tokens": 15}  # BOS + "x"


async def test_chat_stream_sends_role_then_content_then_finish(scripted_api):
    async with scripted_api() as api:
        async with api.http.post("/v1/chat/completions", json=chat_body(max_tokens=9, stream=True)) as resp:
            events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])
    assert "".join(d.get("content", "") for d in deltas) == "The quick"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


async def test_chat_non_streaming_shape_and_usage(scripted_api):
    async with scripted_api() as api:
        async with api.http.post("/v1/chat/completions", json=chat_body(max_tokens=9)) as resp:
            assert resp.status == 200
            data = await resp.json()
    prompt = render_plain_chat([ChatMessage("user", "Hi")]).prompt
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "The quick"}
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"] == {"prompt_tokens": len(prompt) + 1, "completion_tokens": 9, "total_tokens": len(prompt) + 10}
    assert api.backend.generations[0].prompt == prompt


async def test_default_max_tokens_applies_when_omitted(scripted_api):
    async with scripted_api(default_max_tokens=7) as api:
        async with api.http.post("/v1/completions", json={"prompt": "x"}) as resp:
            data = await resp.json()
    assert data["choices"][0] == {"index": 0, "text": "The qui", "logprobs": None, "finish_reason": "length"}
    assert api.backend.generations[0].params.max_tokens == 7


async def test_multibyte_characters_arrive_whole(scripted_api):
    reply = "héllo ☃ 🍲"
    async with scripted_api(ScriptedBackend(reply=reply, repeat=False)) as api:
        async with api.http.post("/v1/completions", json={"prompt": "x", "stream": True}) as resp:
            events = await sse_events(resp)
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == reply and "\ufffd" not in "".join(texts)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "stop, text, finish",
    [
        (["def"], "abc", "stop"),
        (["ghi", "cd"], "ab", "stop"),  # the earliest match wins, whatever the order
        ("j", "abcdefghi", "stop"),  # a single string is a stop too
        (["zz"], "abcdefghijabcd", "length"),
    ],
)
async def test_stop_sequences_split_across_tokens(scripted_api, stream, stop, text, finish):
    # One token per character: every stop string of two or more characters spans tokens.
    async with scripted_api(ScriptedBackend(reply="abcdefghij")) as api:
        body = {"prompt": "x", "max_tokens": 14, "stop": stop, "stream": stream}
        async with api.http.post("/v1/completions", json=body) as resp:
            if stream:
                events = (await sse_events(resp))[:-1]
                got = "".join(e["choices"][0]["text"] for e in events)
                got_finish = events[-1]["choices"][0]["finish_reason"]
            else:
                choice = (await resp.json())["choices"][0]
                got, got_finish = choice["text"], choice["finish_reason"]
    assert (got, got_finish) == (text, finish)


async def test_chat_template_stop_ends_the_turn(scripted_api):
    # The plain template's stop ("\nUser:") is merged with the request's own stops.
    async with scripted_api(ScriptedBackend(reply="Sure.\nUser: and now?")) as api:
        async with api.http.post("/v1/chat/completions", json=chat_body(stop=["never"])) as resp:
            data = await resp.json()
    assert data["choices"][0]["message"]["content"] == "Sure."
    assert data["choices"][0]["finish_reason"] == "stop"
    assert set(api.backend.generations[0].params.stop) == {"never", "\nUser:", "\nSystem:"}


async def test_concurrent_requests_each_get_their_own_answer(scripted_api):
    backend = ScriptedBackend(reply=lambda prompt: f"<{prompt}>", repeat=False)
    async with scripted_api(backend, max_queue=8) as api:

        async def one(i: int) -> str:
            async with api.http.post("/v1/completions", json={"prompt": f"request {i}"}) as resp:
                assert resp.status == 200
                return (await resp.json())["choices"][0]["text"]

        texts = await asyncio.gather(*(one(i) for i in range(8)))
    assert texts == [f"<request {i}>" for i in range(8)]
    assert api.metric("potluck_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == 8


async def test_queue_overflow_gives_429_with_retry_after(scripted_api):
    backend = ScriptedBackend()
    backend.hold(after=1)  # the first request generates one token, then keeps the model busy
    async with scripted_api(backend, max_queue=1) as api:

        async def complete() -> tuple[int, str]:
            async with api.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}) as resp:
                return resp.status, (await resp.json())["choices"][0]["text"]

        busy = asyncio.create_task(complete())
        queued: asyncio.Task | None = None
        try:
            await until_async(lambda: backend.held, 10, "the first generation to hold")
            queued = asyncio.create_task(complete())
            await until_async(lambda: api.runner.queue_depth == 1, 2, "the second request to queue")
            assert api.metric("potluck_queue_depth") == 1
            async with api.http.post("/v1/completions", json={"prompt": "x"}) as resp:
                assert resp.status == 429
                assert int(resp.headers["Retry-After"]) >= 1
                err = (await resp.json())["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
            backend.release()
            assert await busy == (200, "The q") and await queued == (200, "The q")
        finally:
            backend.release()
            # Collect the requests' outcomes so none is left as an unretrieved task exception.
            await asyncio.gather(busy, *([queued] if queued else []), return_exceptions=True)


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_cancels_generation(scripted_api, stream):
    backend = ScriptedBackend()
    backend.hold(after=3)
    async with scripted_api(backend) as api:
        body = {"prompt": "x", "max_tokens": 400, "stream": stream}

        async def read_some() -> None:
            async with api.http.post("/v1/completions", json=body) as resp:
                await resp.content.readline()  # streaming: the first event arrived
                await asyncio.Event().wait()  # and the client reads no more

        client = asyncio.create_task(read_some())
        await until_async(lambda: backend.held, 10, "the generation to be under way")
        client.cancel()  # the client goes away: its connection closes
        with pytest.raises(asyncio.CancelledError):
            await client
        record = backend.generations[0]
        await until_async(lambda: record.done, 10, "the generation to stop")
        assert record.cancelled and record.n_tokens == 3
        assert api.runner.active == 0
        backend.release()
        async with api.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}) as resp:
            assert resp.status == 200  # the model is free again


async def test_failure_mid_stream_ends_with_an_error_event(scripted_api):
    backend = ScriptedBackend(fail_after=4)
    backend.hold(after=4)  # the stream starts (headers go out with the first tokens) before it fails
    async with scripted_api(backend) as api:
        async with api.http.post("/v1/completions", json={"prompt": "x", "stream": True}) as resp:
            assert resp.status == 200
            backend.release()
            events = await sse_events(resp)
        async with api.http.post("/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 500
            whole = await resp.json()
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "The "
    assert events[-1]["error"]["type"] == "server_error" and "scripted failure" in events[-1]["error"]["message"]
    assert "[DONE]" not in events
    assert whole["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    "path, payload, status, needle",
    [
        ("/v1/chat/completions", b"{not json", 400, "malformed JSON"),
        ("/v1/chat/completions", b"[]", 400, "invalid parameter"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "temperature": 7}',
            400,
            "temperature",
        ),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "stop": ["a","b","c","d","e"]}', 400, "stop"),
        ("/v1/completions", b'{"prompt": "x", "model": "no-such-model"}', 404, "not served"),
        ("/v1/completions", b'{"prompt": "' + b"y" * (2 << 20) + b'"}', 413, "larger than"),
        ("/v1/nothing", b"{}", 404, "Not Found"),
    ],
)
async def test_bad_input_gets_openai_error_and_node_keeps_serving(scripted_api, path, payload, status, needle):
    async with scripted_api() as api:
        async with api.http.post(path, data=payload, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status
            err = (await resp.json())["error"]
        assert needle in err["message"] and err["type"]
        async with api.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as resp:
            assert resp.status == 200
    assert api.backend.generations[-1].prompt == "x"  # the bad request reached no model
    assert len(api.backend.generations) == 1


async def test_prompt_longer_than_context_is_400(scripted_api):
    async with scripted_api(ScriptedBackend(n_ctx=64)) as api:
        async with api.http.post("/v1/completions", json={"prompt": "word " * 20, "max_tokens": 5}) as resp:
            assert resp.status == 400
            assert "context" in (await resp.json())["error"]["message"]
    assert api.backend.generations == []


async def test_503_while_loading_then_served(scripted_api):
    async with scripted_api(loaded=False) as api:
        async with api.http.post("/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            err = (await resp.json())["error"]
        assert err["code"] == "model_loading" and err["type"] == "service_unavailable"
        async with api.http.get("/healthz") as resp:
            assert (await resp.json())["status"] == "loading"
        await api.load()
        async with api.http.get("/healthz") as resp:
            assert (await resp.json())["status"] == "ok"
        async with api.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as resp:
            assert resp.status == 200
