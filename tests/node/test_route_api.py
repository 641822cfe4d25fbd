"""``GET /api/route/explain``, ``potluck route explain``, ``X-Potluck-Route`` and the route pin, on
the scripted API (a real HTTP server and router; the model is the in-memory backend)."""

from __future__ import annotations

import asyncio

from typer.testing import CliRunner

from potluck.cli.app import app


async def test_explain_lists_the_local_candidate_with_its_score(scripted_api):
    async with scripted_api() as api:
        model = api.backend.info.model_id
        async with api.http.get(f"/api/route/explain?model={model}&max_tokens=32") as resp:
            assert resp.status == 200
            plan = await resp.json()
        assert plan["model"] == model
        [local] = plan["candidates"]
        assert local["key"] == "local" and local["kind"] == "local" and local["allowed"] and local["tier"] == 0
        assert local["score"] > 0 and local["predicted_latency_s"] > local["predicted_ttft_s"] > 0

        async with api.http.get("/api/route/explain?modle=x") as resp:  # a misspelt parameter is named
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "modle"
        async with api.http.get("/api/route/explain?model=nope") as resp:
            assert resp.status == 404


async def test_completion_carries_the_routers_choice_and_a_pin_is_honoured(scripted_api):
    async with scripted_api() as api:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with api.http.post("/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            route = resp.headers["X-Potluck-Route"]
        assert route.startswith("local; target=12D3KooW") and "key=local" in route and 'why="best score' in route
        pinned = {"X-Potluck-Route-Pin": "peer:nobody"}
        async with api.http.post("/v1/chat/completions", json=body, headers=pinned) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["param"] == "x-potluck-route-pin" and "peer:nobody" in error["message"]


async def test_cli_prints_the_ranked_candidates(scripted_api):
    async with scripted_api() as api:
        url = str(api.http._base_url).rstrip("/")
        model = api.backend.info.model_id
        args = ["route", "explain", "--model", model, "--url", url]
        result = await asyncio.to_thread(CliRunner().invoke, app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert f"routes for {model!r}" in result.output and "local" in result.output and "allowed" in result.output
