"""``POST /v1/responses`` on the scripted backend: object shapes, stream event order, tool calls."""

from __future__ import annotations

import json

import aiohttp

from potluck.inference.scripted import ScriptedBackend

TOOL = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
}


async def _events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict]]:
    """``(event, data)`` pairs; each ``event:`` line must match its data's ``type``."""
    out, name = [], None
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            out.append((name, data))
    return out


async def test_non_stream_text_response_shape(scripted_api):
    async with scripted_api(ScriptedBackend(reply="Hello there.", repeat=False)) as api:
        body = {"input": "hi", "instructions": "Be kind.", "max_output_tokens": 64, "store": False}
        async with api.http.post("/v1/responses", json=body) as resp:
            assert resp.status == 200, await resp.text()
            out = await resp.json()
    assert out["object"] == "response" and out["id"].startswith("resp_")
    assert out["status"] == "completed" and out["error"] is None and out["incomplete_details"] is None
    assert out["model"] == "scripted" and out["instructions"] == "Be kind." and out["max_output_tokens"] == 64
    (msg,) = out["output"]
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["status"] == "completed"
    assert msg["content"] == [{"type": "output_text", "text": "Hello there.", "annotations": []}]
    usage = out["usage"]
    assert usage["output_tokens"] == len("Hello there.")
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["input_tokens"] > 0
    prompt = api.backend.generations[0].prompt
    assert prompt.index("Be kind.") < prompt.index("hi")  # instructions first, as a system message


async def test_max_output_tokens_makes_it_incomplete(scripted_api):
    async with scripted_api() as api:
        async with api.http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 5}) as resp:
            out = await resp.json()
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["usage"]["output_tokens"] == 5
    assert api.backend.generations[0].params.max_tokens == 5


async def test_input_items_with_a_tool_round_trip_reach_the_model(scripted_api):
    items = [
        {"type": "message", "role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Time in UTC?"}]},
        {"type": "function_call", "call_id": "call_7", "name": "get_time", "arguments": '{"tz": "UTC"}'},
        {"type": "function_call_output", "call_id": "call_7", "output": "12:00"},
    ]
    async with scripted_api(ScriptedBackend(reply="Noon.", repeat=False)) as api:
        async with api.http.post("/v1/responses", json={"input": items, "tools": [TOOL]}) as resp:
            assert resp.status == 200, await resp.text()
            out = await resp.json()
    assert out["output"][0]["content"][0]["text"] == "Noon."
    prompt = api.backend.generations[0].prompt
    for part in ("Use tools.", "Time in UTC?", '"tz": "UTC"', "12:00", "get_time"):
        assert part in prompt, part


async def test_stream_event_order_for_text(scripted_api):
    async with scripted_api(ScriptedBackend(reply="abc", repeat=False)) as api:
        async with api.http.post("/v1/responses", json={"input": "hi", "stream": True}) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = await _events(resp)
    names = [n for n, _ in events]
    deltas = [d["delta"] for n, d in events if n == "response.output_text.delta"]
    assert "".join(deltas) == "abc"
    k = len(deltas)
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * k,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[0][1]["response"]["status"] == "in_progress"
    ids = {d["response"]["id"] for n, d in events if "response" in d}
    assert len(ids) == 1
    done = dict(events)["response.output_text.done"]
    assert done["text"] == "abc"
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == "abc"
    assert final["usage"]["output_tokens"] == 3


async def test_stream_ends_incomplete_at_max_output_tokens(scripted_api):
    async with scripted_api() as api:
        body = {"input": "hi", "stream": True, "max_output_tokens": 4}
        async with api.http.post("/v1/responses", json=body) as resp:
            events = await _events(resp)
    name, data = events[-1]
    assert name == "response.incomplete" and data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_tool_call_reply_non_stream_and_stream(scripted_api):
    reply = '{"name": "get_time", "arguments": {"tz": "CET"}}'
    async with scripted_api(ScriptedBackend(reply=reply, repeat=False)) as api:
        body = {"input": "What time is it in Berlin?", "tools": [TOOL], "max_output_tokens": 200}
        async with api.http.post("/v1/responses", json=body) as resp:
            out = await resp.json()
        (item,) = out["output"]
        assert item["type"] == "function_call" and item["name"] == "get_time" and item["status"] == "completed"
        assert item["call_id"].startswith("call_") and item["id"].startswith("fc_")
        assert json.loads(item["arguments"]) == {"tz": "CET"}
        assert out["status"] == "completed" and out["tools"] == [TOOL]

        async with api.http.post("/v1/responses", json={**body, "stream": True}) as resp:
            events = await _events(resp)
    assert [n for n, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added = events[2][1]["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress" and added["arguments"] == ""
    assert json.loads(events[4][1]["arguments"]) == {"tz": "CET"}
    assert events[-1][1]["response"]["output"][0]["type"] == "function_call"


async def test_refusals_name_the_parameter(scripted_api):
    cases = [
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "hi", "reasoning": {"effort": "low"}}, "reasoning"),
        ({"input": [], "model": "scripted"}, "input"),
        ({"input": "hi", "text": {"format": {"type": "json_object"}}}, "text.format"),  # no grammar here
        ({"input": "hi", "tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "foo"}}}},
            "text.format",
        ),
    ]
    async with scripted_api() as api:
        for body, param in cases:
            async with api.http.post("/v1/responses", json=body) as resp:
                assert resp.status == 400, (body, await resp.text())
                got = (await resp.json())["error"]["param"]
                # A union's error names the branch after the field ("input.str"); the field leads.
                assert got == param or (param == "input" and got.startswith("input.")), (body, got)
        assert api.backend.generations == []
