"""Parameters on the scripted API: an unknown one is a 400 naming it; the documented harmless ones are
accepted; tool calls and tool history reach the model; features the backend lacks are refused by name."""

from __future__ import annotations

import json

import pytest

from potluck.inference.scripted import ScriptedBackend
from tests.node.conftest import sse_events

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"prompt": "hi", "max_tokens": 4}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


async def _error(api, path: str, body: dict) -> dict:
    async with api.http.post(path, json=body) as resp:
        assert resp.status == 400, await resp.text()
        return (await resp.json())["error"]


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"modalities": ["text"]}, "modalities"),
        ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
        ("/v1/chat/completions", {"presence_penalty": -1}, "presence_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
        (
            "/v1/chat/completions",
            {"stream_options": {"include_usage": True, "continuous": 1}},
            "stream_options.continuous",
        ),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
        ("/v1/chat/completions", {"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
        ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ("/v1/completions", {"best_of": 2}, "best_of"),
        ("/v1/completions", {"suffix": "end"}, "suffix"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"mirostat": 2}, "mirostat"),
    ],
)
async def test_unknown_or_unsupported_parameter_is_a_400_naming_it(scripted_api, path, extra, param):
    base = CHAT if path == "/v1/chat/completions" else COMPLETION
    async with scripted_api() as api:
        error = await _error(api, path, {**base, **extra})
        # A union's error names the branch after the field (tool_choice.literal[...]); the field leads.
        assert error["param"] == param or (param == "tool_choice" and error["param"].startswith("tool_choice.")), error
        assert param.split(".")[0] in error["message"]
        async with api.http.post(path, json=base) as resp:  # the node keeps serving
            assert resp.status == 200


async def test_unknown_message_and_tool_fields_are_named(scripted_api):
    async with scripted_api() as api:
        body = {**CHAT, "messages": [{"role": "user", "content": "hi", "mood": "curious"}]}
        assert (await _error(api, "/v1/chat/completions", body))["param"] == "messages.0.mood"
        tool = {"type": "function", "function": {**WEATHER["function"], "returns": "str"}}
        body = {**CHAT, "tools": [tool]}
        assert (await _error(api, "/v1/chat/completions", body))["param"] == "tools.0.function.returns"


async def test_documented_harmless_parameters_are_accepted(scripted_api):
    harmless = {
        "user": "u-1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "logit_bias": {},
        "stream_options": {"include_usage": True},
        "seed": 1,
        "n": 1,
    }
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": "hello",
            "refusal": None,
            "annotations": [],
            "audio": None,
            "function_call": None,
        },
        {"role": "user", "content": "again"},
    ]
    async with scripted_api() as api:
        body = {**CHAT, **harmless, "messages": history, "parallel_tool_calls": False, "tools": [WEATHER]}
        async with api.http.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
        body = {**COMPLETION, **harmless, "best_of": 1, "suffix": ""}
        async with api.http.post("/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
    ],
)
async def test_a_backend_without_the_feature_refuses_it_by_name(scripted_api, extra, param):
    """The scripted backend declares no grammar/logprobs support: a 400, never a silent drop."""
    async with scripted_api() as api:
        for stream in (False, True):
            error = await _error(api, "/v1/chat/completions", {**CHAT, **extra, "stream": stream})
            assert error["param"] == param, error
        assert api.backend.generations == []


async def test_invalid_schema_is_a_400_before_any_generation(scripted_api):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}
    async with scripted_api() as api:
        error = await _error(api, "/v1/chat/completions", {**CHAT, "response_format": fmt})
        assert error["param"] == "response_format" and "invalid JSON schema" in error["message"]
        assert api.backend.generations == []


async def test_auto_tool_call_reply_becomes_tool_calls(scripted_api):
    reply = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    async with scripted_api(ScriptedBackend(reply=reply, repeat=False)) as api:
        body = {**CHAT, "max_tokens": 200, "tools": [WEATHER]}
        async with api.http.post("/v1/chat/completions", json=body) as resp:
            out = await resp.json()
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert "get_weather" in api.backend.generations[0].prompt  # definitions rendered into the prompt

        async with api.http.post("/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = await sse_events(resp)
        deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
        parts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert parts[0]["id"].startswith("call_") and parts[0]["function"]["name"] == "get_weather"
        assert json.loads("".join(p["function"]["arguments"] for p in parts)) == {"city": "Paris"}
        assert not any(d.get("content") for d in deltas)
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]][-1] == "tool_calls"


async def test_plain_reply_with_tools_streams_as_content(scripted_api):
    async with scripted_api(ScriptedBackend(reply="It is sunny.", repeat=False)) as api:
        body = {**CHAT, "max_tokens": 50, "tools": [WEATHER], "stream": True}
        async with api.http.post("/v1/chat/completions", json=body) as resp:
            events = await sse_events(resp)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
        assert text == "It is sunny."
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_tool_history_reaches_the_model(scripted_api):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    async with scripted_api(ScriptedBackend(reply="Sunny.", repeat=False)) as api:
        body = {**CHAT, "messages": history, "tools": [WEATHER]}
        async with api.http.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
        prompt = api.backend.generations[0].prompt
        assert '"city": "Paris"' in prompt and "sunny, 21 C" in prompt
