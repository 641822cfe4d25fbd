"""A real node (real llama.cpp, real HTTP server on loopback) for API tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from potluck.config import Settings
from potluck.node.daemon import Node


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
            for _ in range(600):
                if node.router.local_routes:
                    break
                await asyncio.sleep(0.05)
            assert node.router.local_routes, "model did not load"
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
