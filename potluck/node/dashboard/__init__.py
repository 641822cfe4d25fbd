"""The web dashboard every node serves on its HTTP port (same listener as the API).

Routes::

    GET  /                              the page (static/index.html; app.js and style.css beside it)
    GET  /static/<file>                 the page's assets, shipped in the package (works offline)
    GET  /api/events                    server-sent events: the sections of :mod:`.views`, then deltas
    POST /api/models/pull               {"model": "owner/repo:file.gguf"}: download with live progress
    GET  /api/requests/<id>/sanitized   the text a request sent past the privacy guard (loopback only)

The page draws everything from the one event stream (no per-widget polling); the chat panel talks
to ``/v1/chat/completions`` like any OpenAI client and reads the route headers
(:mod:`.outbound`). Requests that change something (pull) or reveal a request's text must come from
a loopback address, and a pull must be sent as ``application/json`` (a cross-site form cannot).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from potluck.config import Settings
from potluck.errors import RequestError
from potluck.node.dashboard.outbound import SentLog
from potluck.node.dashboard.pull import Pulls
from potluck.node.dashboard.views import (
    ActivityLog,
    AuditView,
    PeerWatch,
    TensorParallelView,
    Throughput,
    cluster_view,
    models_view,
    node_view,
)
from potluck.node.events import EventHub
from potluck.node.metrics import NodeMetrics
from potluck.privacy.audit import AuditLog
from potluck.routing.router import Router

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies and idle timers from closing the stream

StartTask = Callable[[Coroutine[Any, Any, Any], str], Any]


class Dashboard:
    """The dashboard's state and handlers for one node.

    Args:
        settings: the node's settings.
        router: the node's router (local models, listings, TP backends).
        metrics: the node's counters.
        hub: the node's event hub (its poll loop is owned by the node's TaskOwner).
        peer_id: this node's peer ID.
        started_at: ``time.monotonic()`` at start.
        overlay: the overlay service, or ``None`` without p2p.
        start_task: the node's ``TaskOwner.start`` (pulls run as owned tasks).
        sent: where the API records text sent past the privacy guard.
    """

    def __init__(
        self,
        settings: Settings,
        router: Router,
        metrics: NodeMetrics,
        hub: EventHub,
        *,
        peer_id: str,
        started_at: float,
        overlay: Any,
        start_task: StartTask,
        sent: SentLog,
    ) -> None:
        self.hub = hub
        self.sent = sent
        self._start_task = start_task
        self.activity = ActivityLog()
        self.pulls = Pulls(settings.cache_dir, self._pulls_changed, self._log_activity)
        peers = PeerWatch(self.activity)
        audit = AuditView(AuditLog.in_data_dir(settings.data_dir))
        tp = TensorParallelView(router, self.activity)
        throughput = Throughput(metrics)
        latest: dict[str, Any] = {}

        def cluster() -> dict[str, Any] | None:
            view = cluster_view(overlay)
            peers.update(view)
            latest["cluster"] = view
            return view

        hub.add_source("node", lambda: node_view(settings, router, peer_id, started_at, overlay))
        hub.add_source("cluster", cluster)
        hub.add_source("models", lambda: models_view(router, latest.get("cluster"), settings.cache_dir))
        hub.add_source("tp", tp)
        hub.add_source("audit", audit)
        hub.add_source("throughput", throughput)
        hub.add_source("pulls", self.pulls.view)
        hub.add_source("log", self.activity.view)

    def _pulls_changed(self) -> None:
        self.hub.set_section("pulls", self.pulls.view())

    def _log_activity(self, kind: str, text: str) -> None:
        self.hub.publish("activity", self.activity.add(kind, text))

    def add_routes(self, app: web.Application) -> None:
        """Register the dashboard's routes, and end open event streams when the server shuts down."""
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC_DIR, show_index=False)
        app.router.add_get("/api/events", self.events)
        app.router.add_post("/api/models/pull", self.pull)
        app.router.add_get("/api/requests/{id}/sanitized", self.sanitized)
        app.on_shutdown.append(self._on_shutdown)

    async def _on_shutdown(self, app: web.Application) -> None:
        self.hub.close()

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/events``: the current sections, then every change, until the client leaves."""
        if self.hub.closed:
            raise web.HTTPServiceUnavailable(reason="the node is shutting down")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        sub = self.hub.subscribe()
        try:
            await response.write(b"retry: 2000\n\n")
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):  # not wait_for: it can swallow a cancel
                        event = await sub.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:  # dropped (too far behind) or the hub closed
                    break
                await response.write(event.encode())
        except (ClientConnectionResetError, ConnectionResetError):
            log.debug("an event-stream client went away")
        finally:
            self.hub.unsubscribe(sub)
        return response

    async def pull(self, request: web.Request) -> web.Response:
        """``POST /api/models/pull``: start downloading ``{"model": "owner/repo:file.gguf"}``.

        Raises:
            RequestError: not JSON, no ``model``, not a Hugging Face file, or already pulling.
        """
        _require_loopback(request)
        if request.content_type != "application/json":
            raise RequestError("send the pull request as application/json")
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            raise RequestError(f"malformed JSON body: {exc}") from exc
        spec = body.get("model") if isinstance(body, dict) else None
        if not isinstance(spec, str) or not spec.strip():
            raise RequestError("give the model to pull as {'model': 'owner/repo:file.gguf'}")
        pull_id = self.pulls.begin(spec.strip())
        self._pulls_changed()
        self._start_task(self.pulls.run(pull_id), f"pull-{pull_id}")
        return web.json_response({"id": pull_id, "model": spec.strip()}, status=202)

    async def sanitized(self, request: web.Request) -> web.Response:
        """``GET /api/requests/<id>/sanitized``: what that request sent past the privacy guard."""
        _require_loopback(request)
        item = self.sent.get(request.match_info["id"])
        if item is None:
            raise web.HTTPNotFound(reason="no such request (only the most recent ones are kept)")
        return web.json_response(item.as_dict())


def _require_loopback(request: web.Request) -> None:
    try:
        loopback = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise web.HTTPForbidden(reason="only clients on this machine may use this endpoint")
