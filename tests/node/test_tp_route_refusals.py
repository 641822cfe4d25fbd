"""A tensor-parallel route (SwarmTPBackend, and the one-rank ONNX Runtime backend) declares no grammar
or logprobs support: ``response_format``, a forced ``tool_choice`` and ``logprobs`` are a 400 naming
them. The declaration is static, so the backends are built on the fixture GGUF without forming a
group or loading weights (no peers, no ONNX sessions)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from potluck.config import Settings
from potluck.errors import RequestError
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams
from potluck.sharding.orchestration.ort_backend import OnnxRuntimeBackend
from potluck.sharding.orchestration.swarm_backend import SwarmTPBackend

FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "tinyshakespeare-q4_0.gguf"
TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
CHAT = {"model": "tp-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason=f"fixture model missing: {FIXTURE}")


def _swarm_backend(tmp_path: Path) -> SwarmTPBackend:
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    # ``tp`` is only used by load(), which this test never calls.
    return SwarmTPBackend(settings, FIXTURE, "tp-model", tp=None)  # type: ignore[arg-type]


def _request(**params) -> GenerationRequest:
    return GenerationRequest(
        model="tp-model", params=SamplingParams(max_tokens=4, **params), messages=(ChatMessage("user", "hi"),)
    )


async def test_swarm_tp_route_refuses_grammar_and_logprobs(tmp_path):
    backend = _swarm_backend(tmp_path)
    runner = ModelRunner(backend, 4)
    try:
        route = LoadedModelRoute(runner)
        assert route.features == frozenset()
        route.check(_request())  # plain requests pass
        with pytest.raises(RequestError, match=r"tensor-parallel backend .*grammar") as info:
            route.check(_request(grammar='root ::= "a"'))
        assert info.value.param == "response_format"
        with pytest.raises(RequestError, match="log-probabilities") as info:
            route.check(_request(logprobs=0))
        assert info.value.param == "logprobs"
    finally:
        await asyncio.to_thread(runner.close)


def test_onnxruntime_backend_declares_no_grammar_or_logprobs():
    pytest.importorskip("onnxruntime")
    backend = OnnxRuntimeBackend(FIXTURE, "ort-model", n_ctx=64)
    assert not getattr(backend, "features", frozenset())


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
            "response_format",
        ),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ],
)
async def test_tp_route_through_the_api_is_a_400_naming_the_parameter(scripted_api, tmp_path, extra, param):
    backend = _swarm_backend(tmp_path)
    runner = ModelRunner(backend, 4)
    try:
        async with scripted_api(loaded=False) as api:
            api.router.add_local(LoadedModelRoute(runner))
            for stream in (False, True):
                async with api.http.post("/v1/chat/completions", json={**CHAT, **extra, "stream": stream}) as resp:
                    assert resp.status == 400, await resp.text()
                    error = (await resp.json())["error"]
                assert error["param"] == param, error
                assert param in error["message"]
            body = {"model": "tp-model", "input": "hi", "text": {"format": {"type": "json_object"}}}
            if param == "response_format":
                async with api.http.post("/v1/responses", json=body) as resp:
                    assert resp.status == 400
                    assert (await resp.json())["error"]["param"] == "text.format"
    finally:
        await asyncio.to_thread(runner.close)
