"""Issue 12 on a real model (SmolLM2-135M-Instruct through llama.cpp) in a whole in-process node,
driven by the official ``openai`` client: structured output, tool calls, logprobs, /v1/responses,
refusals that name the parameter. The ONNX Runtime backend's refusals on the tiny fixture model.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai import AsyncOpenAI, BadRequestError

from tests.node.conftest import node_settings, running_node
from tests.real_models import real_model

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
}
M = "smol"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smollm2() -> str:
    return real_model("smollm2-q4_1")


@pytest.fixture
def client(tmp_path, smollm2):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def start(**overrides):
        settings = node_settings(tmp_path, model=smollm2, p2p_enabled=False, n_ctx=1024, model_name=M, **overrides)
        async with running_node(settings) as node:
            async with AsyncOpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0) as c:
                yield c

    return start


async def test_json_schema_output_validates_and_bad_schema_is_400(client):
    async with client() as c:
        fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
        r = await c.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": "Name a big city."}],
            response_format=fmt,
            max_tokens=128,
            temperature=0,
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        r = await c.chat.completions.create(
            model=M, messages=ASK, response_format={"type": "json_object"}, max_tokens=300, temperature=0
        )
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
        with pytest.raises(BadRequestError) as err:
            await c.chat.completions.create(model=M, messages=ASK, response_format=bad)
        assert err.value.body["param"] == "response_format" and "response_format" in err.value.message


async def test_tool_calls_required_named_streaming_and_tool_followup(client):
    async with client() as c:
        r = await c.chat.completions.create(
            model=M, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=64, temperature=0
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)

        named = {"type": "function", "function": {"name": "get_weather"}}
        stream = await c.chat.completions.create(
            model=M, messages=ASK, tools=[WEATHER, TIME], tool_choice=named, max_tokens=64, stream=True
        )
        parts, finish, ids = {}, None, []
        async for chunk in stream:
            ch = chunk.choices[0]
            finish = ch.finish_reason or finish
            for tc in ch.delta.tool_calls or ():
                if tc.id:
                    ids.append(tc.id)
                    parts[tc.index] = {"name": tc.function.name, "arguments": ""}
                parts[tc.index]["arguments"] += tc.function.arguments or ""
        assert finish == "tool_calls" and len(ids) == 1 and parts[0]["name"] == "get_weather"
        args = json.loads(parts[0]["arguments"])
        jsonschema.validate(args, WEATHER["function"]["parameters"])

        history = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'},
        ]
        r = await c.chat.completions.create(model=M, messages=history, tools=[WEATHER, TIME], max_tokens=24)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # The client's own reply object goes back as history unchanged (refusal, annotations...).
        r2 = await c.chat.completions.create(
            model=M, messages=[*ASK, r.choices[0].message.model_dump(), {"role": "user", "content": "ok"}], max_tokens=4
        )
        assert r2.choices[0].message.role == "assistant"


async def test_logprobs_match_llama_cpp(client, smollm2):
    from llama_cpp import Llama

    prompt = "The capital of France is"
    async with client() as c:
        r = await c.completions.create(model=M, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
        ours = r.choices[0].logprobs
        stream = await c.completions.create(
            model=M, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True
        )
        streamed = [lp async for chunk in stream if chunk.choices and (lp := chunk.choices[0].logprobs)]
        chat = await c.chat.completions.create(
            model=M, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
        )
        chat_stream = await c.chat.completions.create(
            model=M, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, stream=True
        )
        chat_streamed = [
            t
            async for ch in chat_stream
            if ch.choices and ch.choices[0].logprobs
            for t in ch.choices[0].logprobs.content
        ]
    ref = Llama(model_path=smollm2, n_ctx=512, logits_all=True, verbose=False)
    want = ref.create_completion(prompt, max_tokens=8, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    ref.close()
    assert ours.tokens == want["tokens"]
    assert ours.token_logprobs == pytest.approx([float(x) for x in want["token_logprobs"]], abs=1e-3)
    for got, exp in zip(ours.top_logprobs, want["top_logprobs"], strict=True):
        assert got.keys() == exp.keys()
        assert all(abs(got[k] - float(exp[k])) < 1e-3 for k in got)
    assert [t for lp in streamed for t in lp.tokens] == ours.tokens
    assert [x for lp in streamed for x in lp.token_logprobs] == pytest.approx(ours.token_logprobs, abs=1e-6)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-9 for t in content)
    assert [(t.token, round(t.logprob, 5)) for t in chat_streamed] == [(t.token, round(t.logprob, 5)) for t in content]


async def test_unsupported_parameter_is_400_naming_it(client):
    async with client() as c:
        with pytest.raises(BadRequestError) as err:
            await c.chat.completions.create(model=M, messages=ASK, extra_body={"mirostat": 2})
        assert err.value.body["param"] == "mirostat" and "mirostat" in err.value.message
        with pytest.raises(BadRequestError) as err:
            await c.chat.completions.create(model=M, messages=ASK, frequency_penalty=0.5)
        assert err.value.body["param"] == "frequency_penalty"
        with pytest.raises(BadRequestError) as err:
            await c.completions.create(model=M, prompt="hi", extra_body={"grammar": "root ::= x"})
        assert err.value.body["param"] == "grammar"
        # Commonly sent, harmless ones are accepted.
        r = await c.chat.completions.create(model=M, messages=ASK, user="u1", max_tokens=2, presence_penalty=0)
        assert r.choices[0].message.content is not None


async def test_responses_api_text_stream_and_tools(client):
    async with client() as c:
        r = await c.responses.create(model=M, input="Say hello.", instructions="Be brief.", max_output_tokens=8)
        assert r.status in ("completed", "incomplete") and r.output_text
        assert r.usage.output_tokens <= 8
        stream = await c.responses.create(
            model=M, input=[{"role": "user", "content": "Say hello."}], max_output_tokens=8, stream=True
        )
        types, deltas, final = [], [], None
        async for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            if ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
        assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
        assert "response.output_text.delta" in types and final.output_text == "".join(deltas)
        tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
        r = await c.responses.create(model=M, input="Weather in Oslo?", tools=[tool], tool_choice="required")
        call = r.output[0]
        assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments)
        follow = [
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 3}'},
        ]
        r = await c.responses.create(model=M, input=follow, tools=[tool], max_output_tokens=16)
        assert r.status in ("completed", "incomplete")


async def test_onnxruntime_route_refuses_grammar_and_logprobs(tmp_path, model_path):
    settings = node_settings(
        tmp_path, model=str(model_path("q8_0")), p2p_enabled=False, backend="onnxruntime", model_name=M
    )
    async with running_node(settings) as node:
        async with AsyncOpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0) as c:
            with pytest.raises(BadRequestError) as err:
                await c.chat.completions.create(model=M, messages=ASK, response_format={"type": "json_object"})
            assert err.value.body["param"] == "response_format"
            with pytest.raises(BadRequestError) as err:
                await c.chat.completions.create(model=M, messages=ASK, tools=[WEATHER], tool_choice="required")
            assert err.value.body["param"] == "tool_choice"
            with pytest.raises(BadRequestError) as err:
                await c.completions.create(model=M, prompt="ROMEO:", logprobs=2)
            assert err.value.body["param"] == "logprobs"
            r = await c.chat.completions.create(model=M, messages=ASK, max_tokens=4)  # still serving
            assert r.choices[0].finish_reason in ("stop", "length")
