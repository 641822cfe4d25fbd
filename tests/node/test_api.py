"""The OpenAI-compatible API on a real node serving a real GGUF through llama.cpp."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

PROMPT = "ROMEO:\nBut soft, what light"


async def sse_events(resp: aiohttp.ClientResponse) -> list:
    events = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def q8(model_path):
    return str(model_path("q8_0"))


async def test_chat_non_streaming(start_node, q8):
    async with start_node(model=q8) as (_, http):
        body = {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 16, "temperature": 0}
        async with http.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            data = await resp.json()
    choice = data["choices"][0]
    assert data["object"] == "chat.completion" and data["model"] == "tinyshakespeare-q8_0"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 16
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 16


async def test_completion_streaming_equals_non_streaming(start_node, q8):
    async with start_node(model=q8) as (_, http):
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        async with http.post("/v1/completions", json=body) as resp:
            whole = await resp.json()
        async with http.post(
            "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == whole["choices"][0]["text"] and text
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 24


async def test_chat_streaming_has_role_then_content(start_node, q8):
    async with start_node(model=q8) as (_, http):
        body = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 12, "stream": True}
        async with http.post("/v1/chat/completions", json=body) as resp:
            events = await sse_events(resp)
    first = events[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert content and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_stop_sequence_ends_generation_and_is_not_returned(start_node, q8):
    async with start_node(model=q8) as (_, http):
        body = {"prompt": PROMPT, "max_tokens": 60, "temperature": 0}
        async with http.post("/v1/completions", json=body) as resp:
            free = (await resp.json())["choices"][0]["text"]
        stop = free[10:13]
        assert len(stop) == 3
        async with http.post("/v1/completions", json={**body, "stop": [stop]}) as resp:
            data = await resp.json()
        async with http.post("/v1/completions", json={**body, "stop": stop, "stream": True}) as resp:
            streamed = "".join(e["choices"][0]["text"] for e in (await sse_events(resp))[:-1])
    text = data["choices"][0]["text"]
    assert text == free[: free.find(stop)] == streamed
    assert data["choices"][0]["finish_reason"] == "stop"


async def test_seed_makes_sampling_reproducible(start_node, q8):
    async with start_node(model=q8) as (_, http):
        body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 1.0, "seed": 1234}
        texts = []
        for _ in range(2):
            async with http.post("/v1/completions", json=body) as resp:
                texts.append((await resp.json())["choices"][0]["text"])
    assert texts[0] == texts[1]


async def test_eight_concurrent_requests_all_complete(start_node, q8):
    async with start_node(model=q8) as (_, http):

        async def one(i: int) -> dict:
            body = {"prompt": f"ROMEO {i}:", "max_tokens": 20, "temperature": 0.7, "seed": i}
            async with http.post("/v1/completions", json=body) as resp:
                assert resp.status == 200
                return await resp.json()

        results = await asyncio.gather(*(one(i) for i in range(8)))
    assert all(r["usage"]["completion_tokens"] == 20 for r in results)


async def test_queue_overflow_gives_429_with_retry_after(start_node, tmp_path):
    # The demo model has a 2048-token context: long generations keep the model busy.
    async with start_node(max_queue=1) as (_node, http):
        body = {"prompt": "x", "max_tokens": 400, "temperature": 1.0}

        async def one():
            async with http.post("/v1/completions", json=body) as resp:
                return resp.status, resp.headers.get("Retry-After"), await resp.json()

        results = await asyncio.gather(*(one() for _ in range(5)))
        statuses = sorted(r[0] for r in results)
        assert statuses.count(200) >= 2 and 429 in statuses
        rejected = next(r for r in results if r[0] == 429)
        assert int(rejected[1]) >= 1 and rejected[2]["error"]["type"] == "rate_limit_error"
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}) as resp:
            assert resp.status == 200  # still serving


async def test_client_disconnect_cancels_generation(start_node):
    async with start_node() as (node, http):
        body = {"prompt": "x", "max_tokens": 2000, "stream": True, "temperature": 1.0}
        async with http.post("/v1/completions", json=body) as resp:
            await resp.content.readline()  # first event arrived: generation is running
            resp.close()
        for _ in range(200):
            runner = node.router.local_routes[0].runner
            if runner.active == 0:
                break
            await asyncio.sleep(0.05)
        assert runner.active == 0
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5}) as resp:
            assert resp.status == 200
        async with http.get("/metrics") as resp:
            metrics = await resp.text()
    generated = [
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("potluck_tokens_generated_total")
    ]
    assert sum(generated) < 2000  # the 2000-token generation stopped early


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
async def test_bad_input_gets_openai_error_and_node_keeps_serving(start_node, q8, path, payload, status, needle):
    async with start_node(model=q8) as (_, http):
        async with http.post(path, data=payload, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status
            err = (await resp.json())["error"]
        assert needle in err["message"] and err["type"]
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as resp:
            assert resp.status == 200


async def test_prompt_longer_than_context_is_400(start_node, q8):
    async with start_node(model=q8) as (_, http):
        async with http.post("/v1/completions", json={"prompt": "word " * 400, "max_tokens": 5}) as resp:
            assert resp.status == 400
            assert "context" in (await resp.json())["error"]["message"]


async def test_503_while_loading(tmp_path, model_path, monkeypatch):
    import threading

    from potluck.inference.llamacpp import LlamaCppBackend
    from tests.node.conftest import node_settings, running_node

    gate = threading.Event()
    real_load = LlamaCppBackend.load

    def gated_load(self):  # the real load, held until the test has seen the loading state
        assert gate.wait(60)
        real_load(self)

    monkeypatch.setattr(LlamaCppBackend, "load", gated_load)
    settings = node_settings(tmp_path, model=str(model_path("q8_0")))
    async with running_node(settings, wait_ready=False) as node, aiohttp.ClientSession(node.url) as http:
        async with http.post("/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            assert (await resp.json())["error"]["code"] == "model_loading"
        async with http.get("/healthz") as resp:
            assert (await resp.json())["status"] == "loading"
        gate.set()
        for _ in range(400):
            if node.router.local_routes:
                break
            await asyncio.sleep(0.05)
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as resp:
            assert resp.status == 200


async def test_models_health_node_and_metrics(start_node, q8):
    async with start_node(model=q8) as (node, http):
        async with http.get("/v1/models") as resp:
            models = await resp.json()
        async with http.get("/healthz") as resp:
            health = await resp.json()
        async with http.get("/api/node") as resp:
            info = await resp.json()
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}) as resp:
            assert resp.status == 200
        async with http.get("/metrics") as resp:
            text = await resp.text()
    assert models["data"][0]["id"] == "tinyshakespeare-q8_0"
    assert health["status"] == "ok"
    assert info["peer_id"] == node.identity.peer_id
    assert info["models"][0]["quantization"] == "Q8_0" and info["models"][0]["n_layers"] == 4
    for name in (
        "potluck_requests_total",
        "potluck_tokens_generated_total",
        "potluck_ttft_seconds_bucket",
        "potluck_request_latency_seconds_bucket",
        "potluck_queue_depth",
    ):
        assert name in text
