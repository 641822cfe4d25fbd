"""Nodes for API tests.

``scripted_api``: the real HTTP API (router, runner, route, metrics) in front of a
:class:`~potluck.inference.scripted.ScriptedBackend`, no llama.cpp and no overlay: for HTTP
behaviour (validation, status codes, SSE framing, stops, cancellation, queueing).
``start_node``: a whole :class:`~potluck.node.daemon.Node` serving a real GGUF through llama.cpp,
for what depends on the real model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from potluck.config import Settings
from potluck.identity import load_or_create_identity
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.inference.scripted import ScriptedBackend
from potluck.node.api import ApiState, build_app
from potluck.node.daemon import Node
from potluck.node.metrics import NodeMetrics
from potluck.routing.router import Router
from tests.helpers import until_async


async def sse_events(resp: aiohttp.ClientResponse) -> list:
    """The ``data:`` events of a server-sent-events response: decoded JSON, or ``"[DONE]"``."""
    events = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def node_settings(tmp_path: Path, **overrides) -> Settings:
    base = {
        "port": 0,
        "data_dir": tmp_path / "data",
        "cache_dir": tmp_path / "cache",
        # The overlay stays on loopback and off the host's real LAN (no zeroconf).
        "p2p_host": "127.0.0.1",
        "p2p_port": 0,
        "lan_discovery": False,
    }
    base.update(overrides)
    return Settings(**base)


@asynccontextmanager
async def running_node(settings: Settings, wait_ready: bool = True) -> AsyncIterator[Node]:
    async with Node(settings) as node:
        if wait_ready:
            await until_async(lambda: node.router.local_routes, 30, "the model to load")
        yield node


@pytest.fixture
def start_node(tmp_path):
    """``async with start_node(model=..., max_queue=...) as (node, session)``."""

    @asynccontextmanager
    async def start(**overrides):
        async with running_node(node_settings(tmp_path, **overrides)) as node:
            async with aiohttp.ClientSession(node.url) as session:
                yield node, session

    return start


@dataclass
class ScriptedApi:
    """The API under test and what stands behind it."""

    backend: ScriptedBackend
    runner: ModelRunner
    router: Router
    metrics: NodeMetrics
    http: aiohttp.ClientSession

    async def load(self) -> None:
        """Finish loading: the model is served from now on (as ``Node`` does once loaded)."""
        await asyncio.to_thread(self.backend.load)
        self.router.add_local(LoadedModelRoute(self.runner))

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def scripted_api(tmp_path):
    """``async with scripted_api(backend, loaded=True, max_queue=...) as api``: ``api.http`` talks to it."""

    @asynccontextmanager
    async def start(backend: ScriptedBackend | None = None, *, loaded: bool = True, **overrides):
        backend = backend or ScriptedBackend()
        settings = node_settings(tmp_path, p2p_enabled=False, **overrides)
        router, metrics = Router(), NodeMetrics()
        runner = ModelRunner(backend, settings.max_queue)
        metrics.track_queue_depth(lambda: float(runner.queue_depth))
        router.mark_loading(backend.info.model_id)
        peer_id = load_or_create_identity(settings.data_dir).peer_id
        state = ApiState(settings, router, metrics, peer_id, time.monotonic())
        app = web.AppRunner(build_app(state), handler_cancellation=True, shutdown_timeout=5, access_log=None)
        await app.setup()
        try:
            site = web.TCPSite(app, "127.0.0.1", 0)
            await site.start()
            host, port = app.addresses[0][:2]
            async with aiohttp.ClientSession(f"http://{host}:{port}") as http:
                api = ScriptedApi(backend, runner, router, metrics, http)
                if loaded:
                    await api.load()
                yield api
        finally:
            backend.release()  # a held generation notices the cancel and ends
            await app.cleanup()
            await asyncio.to_thread(runner.close)

    return start
