"""``GET /readyz``: 503 naming what is still pending (model, overlay) until the node serves, then 200.

``/healthz`` stays a liveness probe (200 as long as the process answers HTTP)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from potluck.config import Settings
from potluck.node.api import ApiState, build_app
from potluck.node.metrics import NodeMetrics
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, ModelInfo, RouteEvent
from potluck.routing.router import Router
from tests.node.conftest import node_settings, running_node

pytestmark = pytest.mark.timeout(120)


class _Served:
    """The least a local route needs to be listed (never asked to generate here)."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.info = ModelInfo(model_id, "llama", 1, 1, "F32", 8, 8, "", 0)
        self.queue_depth = 0
        self.active = 0

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        yield Finished("stop", 0, 0)


async def get(client: TestClient, path: str) -> tuple[int, dict]:
    async with client.get(path) as resp:
        return resp.status, await resp.json()


async def test_readyz_names_what_is_pending_until_model_and_overlay_are_up(tmp_path):
    router = Router()
    router.mark_loading("m")
    overlay = {"up": False}
    state = ApiState(Settings(data_dir=tmp_path), router, NodeMetrics(), "12D3KooWtest", time.monotonic())
    state.overlay_up = lambda: overlay["up"]
    async with TestClient(TestServer(build_app(state))) as client:
        status, body = await get(client, "/readyz")
        assert status == 503 and body["status"] == "starting"
        assert body["pending"] == ["model", "overlay"] and body["model"] == "loading"
        status, health = await get(client, "/healthz")
        assert status == 200 and health["status"] == "loading"  # liveness, not readiness

        router.add_local(_Served("m"))
        status, body = await get(client, "/readyz")
        assert status == 503 and body["pending"] == ["overlay"] and body["overlay"] == "starting"

        overlay["up"] = True
        status, body = await get(client, "/readyz")
        assert status == 200 and body["status"] == "ready" and body["pending"] == []
        assert body["model"] == "loaded" and body["overlay"] == "up"

        state.overlay_up = None  # p2p disabled: the overlay is never pending
        router.mark_loading("m2")  # a second model still loading keeps the node not ready
        status, body = await get(client, "/readyz")
        assert status == 503 and body["pending"] == ["model"] and body["overlay"] == "off"


async def test_a_real_node_is_ready_once_loaded_with_its_overlay(tmp_path, model_path):
    async with running_node(node_settings(tmp_path, model=str(model_path("q8_0")))) as node:
        async with aiohttp.ClientSession(node.url) as session:
            async with session.get("/readyz") as resp:
                body = await resp.json()
                assert resp.status == 200, body
        assert body["pending"] == [] and body["model"] == "loaded" and body["overlay"] == "up"
        assert body["peer_id"] == node.identity.peer_id
