"""The node: owns every component and tears them down in reverse order.

Start-up: identity -> model file validated -> HTTP API listening (503 while loading) -> model
loaded in a worker thread -> served. Shutdown (SIGINT/SIGTERM or a failed component): stop
accepting, let in-flight streams end (cancelled past a grace period), unload the model, exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from aiohttp import web
from rich.console import Console

from potluck.config import Settings
from potluck.errors import PotluckError
from potluck.identity import NodeIdentity, load_or_create_identity
from potluck.inference.backend import Backend
from potluck.inference.embeddings import EmbeddingEngine
from potluck.inference.resolve import ResolvedModel, resolve_model
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.node.api import ApiState, build_app
from potluck.node.auth import authenticator_from_settings
from potluck.node.backends import create_backend
from potluck.node.dashboard import Dashboard
from potluck.node.events import EventHub
from potluck.node.metrics import NodeMetrics
from potluck.node.progress import RichDownloadBar
from potluck.routing.router import Router
from potluck.tasks import TaskOwner

if TYPE_CHECKING:
    from potluck.overlay.service import OverlayService
    from potluck.overlay.tp_port import TensorParallelPort
    from potluck.overlay.verification.verifier import Verifier
    from potluck.sharding.orchestration.ports import SwarmPort
    from potluck.sharding.orchestration.remote import TensorParallelService

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
#: Bytes of the disk-bandwidth measurement at start (a temporary file in the cache).
DISK_PROBE_BYTES = 16 << 20


class Node:
    """A running potluck node (async context manager).

    Attributes:
        identity: the node's key pair and peer ID.
        router: resolves model names to routes.
        metrics: Prometheus metrics.
        url: base URL of the HTTP API once listening.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.auth = authenticator_from_settings(settings)  # keys loaded, bind checked: fails before anything starts
        self.identity: NodeIdentity = load_or_create_identity(settings.data_dir)
        self.router = Router(settings.aliases)
        self.metrics = NodeMetrics()
        self.metrics.track_queue_depth(self._queue_depth)
        self.url = ""
        self.tasks = TaskOwner("node")
        self.events = EventHub()  # the dashboard's event stream; its poll loop is one of self.tasks
        self._stack = AsyncExitStack()
        self._model: ResolvedModel | None = None
        self._backend: Backend | None = None
        self._embedder: EmbeddingEngine | None = None  # --embedding-model, for /v1/embeddings
        self._runners: list[ModelRunner] = []
        self._loading: set[asyncio.Future[None]] = set()  # model loads in flight (not cancellable)
        self.overlay = _make_overlay(settings, self.identity, self.router, self.metrics)
        self.tp = _make_tensor_parallel(settings, self.overlay)
        self.verifier = _make_verifier(settings, self.overlay)  # serving-quality checks (issue 14)

    def _queue_depth(self) -> float:
        return float(sum(r.queue_depth for r in self.router.local_routes))

    async def __aenter__(self) -> Node:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def _start(self) -> None:
        s = self.settings
        # Resolve and validate before listening: a bad --model fails fast with a clear message.
        self._model = await asyncio.to_thread(resolve_model, s.model, s.cache_dir, RichDownloadBar)
        self._backend = create_backend(s, self._model.path, self.tp)
        model_id = self._backend.info.model_id
        self.router.mark_loading(model_id)
        self._stack.push_async_callback(self._unload_all)  # runs after the API has stopped
        if s.embedding_model:
            self._embedder = await asyncio.to_thread(self._embedding_engine, s.embedding_model, model_id)
            self._stack.push_async_callback(asyncio.to_thread, self._embedder.close)
        await self._stack.enter_async_context(self.tasks)
        await self._stack.enter_async_context(self._http())
        await self.tasks.start_ready(self.events.run, "dashboard-events")
        # Route providers and overlay services enter the stack here, after the API is up.
        # Every route of trust tier >= 2 (community peers, cloud) goes through the privacy guard:
        # the router applies it to each such candidate (node/route_wiring.py).
        from potluck.node.route_wiring import cloud_prices, wire_router
        from potluck.privacy.audit import AuditLog
        from potluck.privacy.guard import PrivacyGuard

        guard = PrivacyGuard(AuditLog.in_data_dir(s.data_dir), s.privacy)
        reputation = self.verifier.reputation if self.verifier is not None else None
        wire_router(self.router, s, self.identity.peer_id, guard, reputation)
        if self.overlay is not None:
            from potluck.overlay.peer_routes import PeerRouteProvider

            await self._stack.enter_async_context(self.overlay)
            if self.tp is not None:
                await self._stack.enter_async_context(self.tp)
                self.overlay.tp = self.tp  # tp_join and tp-star streams reach it from now on
                self._stack.callback(setattr, self.overlay, "tp", None)  # unregistered before it stops
            peers = PeerRouteProvider(self.overlay)
            self.router.add_provider(peers)
            self.router.add_discoverer(peers)  # DHT lookup of models the cluster state lacks
            self.router.add_refresher(peers)  # a state sync before a failing request gives up
            self.tasks.start(self._watch_overlay(), "overlay-watch")
            if s.tp_worker or s.tensor_parallel != 1:
                self.tasks.start(self._measure_bandwidths(), "bandwidth-probe")
            if self.verifier is not None:
                from potluck.node.verification import start_checks

                start_checks(self.overlay, self.verifier)
        if s.cloud_url:
            from potluck.privacy.provider import CloudProvider, cloud_config

            provider = CloudProvider(cloud_config(s), s.cloud_model, cloud_prices(s), s.cloud_fallback)
            cloud = await self._stack.enter_async_context(provider)
            self.router.add_provider(cloud)
        self.tasks.start(self._load(self._backend), "load-model")
        if self._embedder is not None:
            self.tasks.start(asyncio.to_thread(self._embedder.load), "load-embedding-model")

    @asynccontextmanager
    async def _http(self) -> AsyncIterator[None]:
        s = self.settings
        state = ApiState(s, self.router, self.metrics, self.identity.peer_id, time.monotonic())
        state.cluster = self.overlay.cluster_view if self.overlay is not None else None
        state.overlay_up = self._overlay_up if self.overlay is not None else None
        state.auth = self.auth
        state.embedder = self._embedder
        state.dashboard = Dashboard(
            s,
            self.router,
            self.metrics,
            self.events,
            peer_id=state.peer_id,
            started_at=state.started_at,
            overlay=self.overlay,
            start_task=self.tasks.start,
            sent=state.sent,
        )
        runner = web.AppRunner(
            build_app(state), handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, s.host, s.port)
            try:
                await site.start()
            except OSError as exc:
                raise PotluckError(f"cannot listen on {s.host}:{s.port}: {exc.strerror}; pick --port") from exc
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            log.info("API listening on %s (OpenAI-compatible: %s/v1)", self.url, self.url)
            yield
        finally:
            log.info("stopping the API")
            await runner.cleanup()

    def _embedding_engine(self, spec: str, chat_model_id: str) -> EmbeddingEngine:
        """The (unloaded) engine for ``--embedding-model``; named like the chat model when it is the same file."""
        s = self.settings
        path = resolve_model(spec, s.cache_dir, RichDownloadBar).path
        same = self._model is not None and path.resolve() == self._model.path.resolve()
        name = chat_model_id if same else path.stem
        return EmbeddingEngine(path, name, n_ctx=s.n_ctx, n_threads=s.n_threads)

    def _overlay_up(self) -> bool:
        """The overlay runs (``GET /readyz``): started and none of its loops died."""
        return self.overlay is not None and self.overlay.started and not self.overlay.failed.is_set()

    async def _watch_overlay(self) -> None:
        assert self.overlay is not None
        await self.overlay.failed.wait()
        raise PotluckError(f"the overlay failed: {self.overlay.failure}")

    async def _measure_bandwidths(self) -> None:
        """Measure, once, the memory and disk bandwidth the tensor-parallel cost model predicts
        ms/token from (:mod:`potluck.sharding.orchestration.forecast`), and advertise them in this
        node's signed record (``hardware.memory_bw`` / ``disk_bw``)."""
        from potluck.sharding.orchestration.forecast import measure_memory_bandwidth, probe_disk_bandwidth

        assert self.overlay is not None
        local = self.overlay.local
        spill = Path(self.settings.cache_dir) / "tp-spill"  # where a windowed rank's layers would live
        try:
            memory_bw = await asyncio.to_thread(measure_memory_bandwidth)
            disk_bw = await asyncio.to_thread(probe_disk_bandwidth, spill, DISK_PROBE_BYTES)
        except Exception as exc:
            log.warning("cannot measure bandwidth (disk probe in %s): %s; peers will assume defaults", spill, exc)
            return
        local.memory_bw, local.disk_bw = memory_bw, disk_bw
        log.info(
            "measured bandwidth: weight streaming %.1f GB/s, disk %.2f GB/s", local.memory_bw / 1e9, local.disk_bw / 1e9
        )
        if self.overlay.started:
            await self.overlay.publish_own_record()

    async def _load(self, backend: Backend) -> None:
        t0 = time.perf_counter()
        runner = ModelRunner(backend, self.settings.max_queue)
        self._runners.append(runner)
        # A load cannot be cancelled mid-way (llama.cpp is still building the context), so shutdown
        # waits for it in _unload_all: closing the model under a running load crashed the process.
        loading = asyncio.ensure_future(asyncio.to_thread(backend.load))
        self._loading.add(loading)
        loading.add_done_callback(self._loading.discard)
        await asyncio.shield(loading)
        self.router.add_local(LoadedModelRoute(runner))
        if self.verifier is not None:  # advertise the GGUF's SHA-256 and defend it against challenges
            from potluck.node.verification import register_model

            await register_model(self.settings, self.verifier, runner)
        log.info("serving model %s (loaded in %.1f s)", backend.info.model_id, time.perf_counter() - t0)
        if self.overlay is not None and self.overlay.started:
            await self.overlay.publish_own_record()  # announce the model now, not at the next heartbeat

    async def _unload_all(self) -> None:
        if self._loading:
            await asyncio.wait(set(self._loading))
        while self._runners:
            runner = self._runners.pop()
            self.router.remove_local(runner.backend.info.model_id)
            await asyncio.to_thread(runner.close)
            log.info("model %s unloaded", runner.backend.info.model_id)

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    @property
    def is_demo(self) -> bool:
        return bool(self._model and self._model.is_demo)


def _make_overlay(settings: Settings, identity: NodeIdentity, router: Router, metrics: NodeMetrics) -> Any:
    """The overlay service (not started), or ``None`` when ``p2p_enabled`` is off."""
    if not settings.p2p_enabled:
        return None
    from potluck import __version__
    from potluck.overlay.service import OverlayService
    from potluck.overlay.serving import LocalServing

    local = LocalServing(
        router, settings.serve_rate_limit_tps, settings.serve_flush_interval_s, int(settings.memory_budget)
    )
    return OverlayService(settings, identity, local, metrics.registry, __version__)


def _make_verifier(settings: Settings, overlay: OverlayService | None) -> Verifier | None:
    """The serving-quality verifier wired into the overlay, or ``None`` without the overlay. Its
    ``reputation(peer)`` and ``excluded(peer)`` are what routing consults."""
    if overlay is None:
        return None
    from potluck.node.verification import attach_verifier

    return attach_verifier(settings, overlay)


def _make_tensor_parallel(settings: Settings, overlay: OverlayService | None) -> TensorParallelService | None:
    """The tensor-parallel service (not started) wired to the overlay through the two ports, or
    ``None`` without the overlay. The annotated locals make mypy check both protocols."""
    if overlay is None:
        return None
    from potluck.overlay.tp_swarm import OverlaySwarmPort
    from potluck.sharding.orchestration.remote import TensorParallelService

    swarm: SwarmPort = OverlaySwarmPort(overlay)
    tp = TensorParallelService(settings, swarm)
    port: TensorParallelPort = tp
    del port
    return tp


def _banner(node: Node, console: Console) -> None:
    console.print(f"[bold]potluck node[/] peer ID [cyan]{node.identity.peer_id}[/]")
    console.print(f"API: {node.url}/v1   metrics: {node.url}/metrics   dashboard: {node.url}/")
    if node.is_demo:
        console.print(
            "[bold yellow]warning:[/] no model configured and none cached: serving the built-in demo "
            "model, whose weights are RANDOM (its answers are gibberish). Pass a real model with "
            "`--model PATH.gguf` or `--model owner/repo:file.gguf`, or run `potluck models pull`."
        )


async def serve(settings: Settings, console: Console | None = None) -> int:
    """Run a node until SIGINT/SIGTERM; returns the exit code (0 clean, 1 a component failed)."""
    console = console or Console(stderr=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with Node(settings) as node:
            _banner(node, console)
            stopper = asyncio.ensure_future(stop.wait())
            failer = asyncio.ensure_future(node.tasks.failed.wait())
            try:
                await asyncio.wait({stopper, failer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                failer.cancel()
            log.info("shutting down")
            if node.tasks.failure is not None:
                failure = node.tasks.failure
                raise failure if isinstance(failure, PotluckError) else PotluckError(str(failure))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def run_node(settings: Settings) -> None:
    """Blocking entry point for ``potluck node start``.

    Raises:
        PotluckError: start-up failed or a component failed while running.
    """
    asyncio.run(serve(settings))
