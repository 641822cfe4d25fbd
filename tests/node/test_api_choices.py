"""``n > 1`` and ``/v1/completions`` prompt arrays (:mod:`potluck.node.choices`) on the scripted backend."""

from __future__ import annotations

import pytest

from potluck.inference.scripted import ScriptedBackend
from tests.node.conftest import sse_events


async def test_chat_n_returns_indexed_choices_with_seed_plus_i(scripted_api):
    async with scripted_api(ScriptedBackend(reply="hi there", repeat=False)) as api:
        body = {"messages": [{"role": "user", "content": "x"}], "n": 3, "seed": 40, "max_tokens": 8}
        resp = await api.http.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
        out = await resp.json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert all(c["message"]["content"] == "hi there" for c in out["choices"])
        assert sorted(g.params.seed for g in api.backend.generations) == [40, 41, 42]
        # one prompt, counted once; three completions of 8 tokens each
        n_prompt = out["usage"]["prompt_tokens"]
        assert out["usage"]["completion_tokens"] == 3 * len("hi there")
        assert out["usage"]["total_tokens"] == n_prompt + 3 * len("hi there")


async def test_chat_n_streams_interleaved_chunks_with_their_index(scripted_api):
    async with scripted_api(ScriptedBackend(reply="abc", repeat=False)) as api:
        body = {
            "messages": [{"role": "user", "content": "x"}],
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        resp = await api.http.post("/v1/chat/completions", json=body)
        assert resp.status == 200
        events = await sse_events(resp)
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        chunks = [e for e in events[:-2] if e["choices"]]
        text = {0: "", 1: ""}
        finish = {}
        for e in chunks:
            (choice,) = e["choices"]
            text[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finish[choice["index"]] = choice["finish_reason"]
        assert text == {0: "abc", 1: "abc"}
        assert finish == {0: "stop", 1: "stop"}
        assert len({e["id"] for e in events[:-1]}) == 1  # one response id across choices
        assert usage["completion_tokens"] == 6


async def test_completions_prompt_array_indexes_prompt_major(scripted_api):
    backend = ScriptedBackend(reply=lambda prompt: prompt.upper()[:3], repeat=False)
    async with scripted_api(backend) as api:
        body = {"prompt": ["ab", "cd"], "n": 2, "max_tokens": 4, "echo": True}
        resp = await api.http.post("/v1/completions", json=body)
        assert resp.status == 200, await resp.text()
        out = await resp.json()
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        texts = [c["text"] for c in out["choices"]]
        assert texts[0] == texts[1] and texts[0].startswith("ab")
        assert texts[2] == texts[3] and texts[2].startswith("cd")


async def test_completions_prompt_array_streams(scripted_api):
    async with scripted_api(ScriptedBackend(reply="zz", repeat=False)) as api:
        resp = await api.http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "stream": True})
        events = await sse_events(resp)
        seen = {e["choices"][0]["index"] for e in events[:-1] if e["choices"]}
        assert seen == {0, 1, 2}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": ["a"] * 5, "n": 4}, "n"),
    ],
)
async def test_bad_choice_requests_are_400_naming_the_parameter(scripted_api, body, param):
    async with scripted_api() as api:
        resp = await api.http.post("/v1/completions", json={"max_tokens": 2, **body})
        assert resp.status == 400
        err = (await resp.json())["error"]
        assert f"'{param}" in err["message"]
        # and the node keeps serving
        ok = await api.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert ok.status == 200


async def test_queue_full_for_n_choices_is_429(scripted_api):
    async with scripted_api(max_queue=1) as api:
        body = {"messages": [{"role": "user", "content": "x"}], "n": 4, "max_tokens": 2}
        resp = await api.http.post("/v1/chat/completions", json=body)
        assert resp.status == 429
