"""The API on a whole node serving a real GGUF through llama.cpp: what depends on the real model
(its name and metadata, greedy determinism, seeded sampling) and on the node's start-up order.

HTTP behaviour that does not depend on the model is tested on the scripted backend (test_api.py).
"""

from __future__ import annotations

import threading

import aiohttp
import pytest

from tests.helpers import until_async
from tests.node.conftest import node_settings, running_node, sse_events

PROMPT = "ROMEO:\nBut soft, what light"


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
    assert chunks[-1]["usage"]["completion_tokens"] == 24


async def test_seed_makes_sampling_reproducible(start_node, q8):
    async with start_node(model=q8) as (_, http):
        body = {"prompt": "ROMEO:", "max_tokens": 20, "temperature": 1.0, "seed": 1234}
        texts = []
        for _ in range(2):
            async with http.post("/v1/completions", json=body) as resp:
                texts.append((await resp.json())["choices"][0]["text"])
    assert texts[0] == texts[1]


async def test_api_answers_503_until_the_model_has_loaded(tmp_path, model_path, monkeypatch):
    from potluck.inference.llamacpp import LlamaCppBackend

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
        async with http.get("/healthz") as resp:
            assert (await resp.json())["status"] == "loading"
        gate.set()
        await until_async(lambda: node.router.local_routes, 30, "the model to load")
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
