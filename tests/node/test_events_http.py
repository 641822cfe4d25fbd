"""The dashboard's HTTP side on a bare API app (scripted backend, no overlay, no llama.cpp): the page
and its assets, ``/api/events`` (snapshot first, then deltas, ended on shutdown), a pull that fails
with a clear error, the route headers and the sent-text endpoint."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from potluck.identity import load_or_create_identity
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.inference.scripted import ScriptedBackend
from potluck.node.api import ApiState, build_app
from potluck.node.dashboard import Dashboard
from potluck.node.events import EventHub
from potluck.node.metrics import NodeMetrics
from potluck.routing.router import Router
from potluck.tasks import TaskOwner
from tests.node.conftest import node_settings


@asynccontextmanager
async def dashboard_app(tmp_path, **overrides) -> AsyncIterator[tuple[aiohttp.ClientSession, EventHub]]:
    settings = node_settings(tmp_path, p2p_enabled=False, **overrides)
    backend = ScriptedBackend(reply="Hello there.", repeat=False)
    router, metrics = Router(), NodeMetrics()
    runner = ModelRunner(backend, settings.max_queue)
    await asyncio.to_thread(backend.load)
    router.add_local(LoadedModelRoute(runner))
    hub = EventHub(interval_s=0.05)
    peer_id = load_or_create_identity(settings.data_dir).peer_id
    async with TaskOwner("test") as tasks:
        state = ApiState(settings, router, metrics, peer_id, time.monotonic())
        state.dashboard = Dashboard(
            settings, router, metrics, hub, peer_id=peer_id, started_at=time.monotonic(), overlay=None,
            start_task=tasks.start, sent=state.sent,
        )  # fmt: skip
        await tasks.start_ready(hub.run, "events", timeout=5)
        app = web.AppRunner(build_app(state), handler_cancellation=True, shutdown_timeout=5, access_log=None)
        await app.setup()
        try:
            site = web.TCPSite(app, "127.0.0.1", 0)
            await site.start()
            host, port = app.addresses[0][:2]
            async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
                yield http, hub
        finally:
            t0 = time.monotonic()
            await app.cleanup()
            assert time.monotonic() - t0 < 2, "an open event stream held the shutdown"
            await asyncio.to_thread(runner.close)


async def read_events(resp: aiohttp.ClientResponse, until_kind: str) -> dict[str, object]:
    """Parse SSE from ``resp`` into {kind: data} until an event of kind ``until_kind`` arrives."""
    seen: dict[str, object] = {}
    kind = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind:
            seen[kind] = json.loads(line[6:])
            if kind == until_kind:
                return seen
    raise AssertionError(f"stream ended before a {until_kind} event; saw {sorted(seen)}")


async def test_page_and_assets_are_served_from_the_package(tmp_path):
    async with dashboard_app(tmp_path) as (http, _):
        async with http.get("/") as resp:
            html = await resp.text()
            assert resp.status == 200 and "/static/app.js" in html and "http" not in html.split("<body>")[1]
        for asset, kind in (("app.js", "javascript"), ("style.css", "css")):
            async with http.get(f"/static/{asset}") as resp:
                assert resp.status == 200 and kind in resp.headers["Content-Type"]
        async with http.get("/static/../__init__.py") as resp:
            assert resp.status in (403, 404)


async def test_event_stream_starts_with_the_snapshot_and_follows_changes(tmp_path):
    async with dashboard_app(tmp_path) as (http, hub):
        async with http.get("/api/events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            snap = await read_events(resp, "log")
            assert {"node", "cluster", "models", "tp", "audit", "throughput", "pulls", "log"} <= set(snap)
            assert snap["cluster"] is None and snap["node"]["p2p"] is False
            assert [m["id"] for m in snap["models"]["reachable"]] == ["scripted"]
            hub.publish("activity", {"text": "hello"})
            assert (await read_events(resp, "activity"))["activity"] == {"text": "hello"}


async def test_pull_offline_fails_with_a_clear_error_in_the_stream(tmp_path, hub_offline):
    async with dashboard_app(tmp_path) as (http, _):
        async with http.post("/api/models/pull", data="model=x", headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 400  # a cross-site form cannot start a download
        async with http.post("/api/models/pull", json={"model": "not a spec"}) as resp:
            assert resp.status == 400 and "owner/repo:file.gguf" in (await resp.json())["error"]["message"]
        async with http.get("/api/events") as events:
            await read_events(events, "log")
            async with http.post("/api/models/pull", json={"model": "someone/nothing:missing.gguf"}) as resp:
                assert resp.status == 202
            for _ in range(50):
                pulls = (await read_events(events, "pulls"))["pulls"]
                if pulls and pulls[-1]["state"] != "running":
                    break
            assert pulls[-1]["state"] == "failed" and "no network connection" in pulls[-1]["error"]


async def test_local_route_header_and_no_sent_text(tmp_path):
    async with dashboard_app(tmp_path) as (http, _):
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
        async with http.post("/v1/chat/completions", json=body) as resp:
            await resp.read()
            assert resp.headers["X-Potluck-Route"].startswith("local; target=12D3KooW")
            assert resp.headers["X-Potluck-Sanitized"] == "no" and "X-Potluck-Request-Id" not in resp.headers
        async with http.get("/api/requests/deadbeef/sanitized") as resp:
            assert resp.status == 404
