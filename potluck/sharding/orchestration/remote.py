"""Tensor-parallel work between swarm peers: the node-side service and the worker's session.

:class:`TensorParallelService` is what the overlay calls for tensor parallelism: it implements
:class:`potluck.overlay.tp_port.TensorParallelPort` structurally, and the node registers it as the
overlay's ``tp``. It reaches the swarm only through a
:class:`~potluck.sharding.orchestration.ports.SwarmPort`.

- worker side, RPC ``tp_join`` (:meth:`TensorParallelService.join`, the payload validated into a
  :class:`~potluck.sharding.orchestration.messages.TpJoinRequest`): accepted only when
  ``tp_worker`` is on, a session slot is free and this node's memory budget holds the share's KV
  cache and at least one of its layers (a share larger than the budget is streamed, a layer window);
  the reply goes back at once and a :class:`WorkerSession` runs in a thread: it connects to the
  master's star over direct TCP (the addresses in the request), or over a ``/potluck/tp-star/1``
  libp2p stream when no TCP path works or the master asks for it, authenticates with the session
  key that came inside the admitted, Noise-encrypted RPC, fetches its shard over that channel
  (content-addressed chunks checked against their SHA-256, cached by (model SHA-256, plan hash)),
  compiles it, joins the ready barrier (:mod:`~potluck.sharding.orchestration.readiness`) and serves
  the master's broadcasts until it says stop or goes;
- master side: tp-star streams from workers are delivered to the group that waits for them
  (:meth:`TensorParallelService.accept_stream`, registry :attr:`TensorParallelService.pending`).

A worker that donates compute honours ``serve_rate_limit_tps`` (forward passes per second), the same
cap that bounds the tokens it streams to peers, so a donor machine stays usable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from potluck.config import Settings
from potluck.errors import (
    ClosedError,
    ConnectError,
    ModelFileError,
    PeerRefused,
    ProtocolViolation,
    ShardPlanError,
    TransferError,
)
from potluck.identity import PeerId
from potluck.sharding.collective import transfer
from potluck.sharding.collective.channel import ByteStream, FrameChannel
from potluck.sharding.collective.star import DEFAULT_POLL_S, StarWorker
from potluck.sharding.format.cost import rank_sizing
from potluck.sharding.format.plan import ShardPlan
from potluck.sharding.format.shard_file import read_shard
from potluck.sharding.orchestration.messages import TpJoinReply, TpJoinRequest
from potluck.sharding.orchestration.pending import PendingJoin
from potluck.sharding.orchestration.ports import SwarmPort
from potluck.sharding.orchestration.readiness import ready_barrier
from potluck.tasks import TaskOwner

if TYPE_CHECKING:  # the engine (ONNX Runtime) loads only when a session starts
    from potluck.sharding.compute.engine import RankCompute

log = logging.getLogger(__name__)

_STOP_GRACE_S = 5.0


def default_threads(n_threads: int | None) -> int:
    """ONNX Runtime threads of a rank: the setting, or every core."""
    return n_threads or os.cpu_count() or 1


class _Throttled:
    """A worker's :class:`~potluck.sharding.collective.base.Collective` that serves at most ``rate``
    forward passes per second (0: no cap)."""

    def __init__(self, inner: StarWorker, rate: float) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self._gap = 1.0 / rate if rate > 0 else 0.0
        self._next = 0.0

    def receive(self) -> tuple[dict[str, Any], np.ndarray | None]:
        header, array = self.inner.receive()
        if self._gap and header.get("op") == "forward":
            now = time.monotonic()
            if now < self._next:
                time.sleep(self._next - now)
            self._next = max(now, self._next) + self._gap
        return header, array

    def broadcast(self, header: dict[str, Any], array: np.ndarray | None = None) -> None:
        raise TypeError("broadcast() is for the master")

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        return self.inner.all_reduce(array)

    def gather(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]] = ()) -> list[np.ndarray]:
        return self.inner.gather(array, shapes)

    def close(self) -> None:
        self.inner.close()


class WorkerSession:
    """One rank of a master's group, run in a thread (:meth:`run`).

    Args:
        request: the master's ``tp_join`` (session key inside).
        plan: the parsed plan of the request.
        master: the master's peer ID (Noise-authenticated on the RPC stream).
        settings: this node's settings (threads, cache, rate cap, join deadline).
        swarm: the swarm (for the libp2p fallback of the star).
    """

    def __init__(
        self, request: TpJoinRequest, plan: ShardPlan, master: PeerId, settings: Settings, swarm: SwarmPort
    ) -> None:
        self.request = request
        self.plan = plan
        self.master = master
        self.settings = settings
        self.swarm = swarm
        self.transport = ""
        self.collective: StarWorker | None = None
        self._aborted = threading.Event()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return f"rank {self.request.rank}/{self.request.world_size} of {self.master[-8:]}:{self.request.session[:8]}"

    def run(self) -> None:
        """Connect, fetch the shard, load, serve. Logs and returns on every expected failure."""
        try:
            worker = self._connect()
        except (ConnectError, PeerRefused, ProtocolViolation, TransferError, ClosedError) as exc:
            log.warning("tensor-parallel %s: cannot reach the master's star: %s", self.name, exc)
            return
        with self._lock:
            self.collective = worker
        if self._aborted.is_set():
            worker.close()
            return
        log.info("tensor-parallel %s: joined the star over %s", self.name, self.transport)
        try:
            compute = self._load(worker)
            r = self.request  # the master waits for the slowest rank: the join deadline
            ready_barrier(worker, r.rank, r.world_size, self.settings.tp_join_timeout_s, r.timeout_s)
            from potluck.sharding.compute.engine import serve_worker

            serve_worker(_Throttled(worker, self.settings.serve_rate_limit_tps), compute)
            log.info("tensor-parallel %s: the master said stop", self.name)
        except (TransferError, ClosedError) as exc:
            log.info("tensor-parallel %s ended: %s", self.name, exc)
        except (ProtocolViolation, PeerRefused, ShardPlanError, ModelFileError, OSError) as exc:
            log.warning("tensor-parallel %s failed: %s", self.name, exc)
        finally:
            worker.close()

    def _connect(self) -> StarWorker:
        r = self.request
        errors: list[str] = []
        if r.transport in ("auto", "tcp"):
            for host, port in r.star_addrs:
                try:
                    worker = StarWorker.connect(
                        (host, port), r.rank, r.world_size, r.key, timeout_s=r.timeout_s, poll_s=DEFAULT_POLL_S
                    )
                except ConnectError as exc:
                    errors.append(str(exc))
                    continue
                self.transport = "tcp"
                return worker
        if r.transport in ("auto", "libp2p"):
            channel = FrameChannel(self.swarm.open_star_stream(self.master, r.session, r.rank))
            worker = StarWorker.over(channel, r.rank, r.world_size, r.key, timeout_s=r.timeout_s)
            self.transport = "libp2p"
            return worker
        raise ConnectError(f"no direct TCP path to the master ({'; '.join(errors) or 'no addresses'})")

    def _load(self, worker: StarWorker) -> RankCompute:
        from potluck.sharding.compute.engine import EngineOptions, RankCompute

        r = self.request
        cache_root = Path(self.settings.cache_dir) / "tp-cache"
        had = (transfer.cache_dir(cache_root, r.model_sha256, r.plan_hash) / "shard.bin").is_file()
        path = transfer.fetch_shard(
            worker.channel,
            r.model_sha256,
            r.plan_hash,
            cache_root,
            expect_sha256=r.shard_sha256,
            timeout_s=max(30.0, r.timeout_s),
        )
        log.info(
            "tensor-parallel %s: shard %s/%s (%.1f MB) %s",
            self.name,
            r.model_sha256[:12],
            r.plan_hash,
            path.stat().st_size / 1e6,
            "found in the cache" if had else "received from the master",
        )
        shard = read_shard(path)
        if int(shard.meta.get("rank", -1)) != r.rank or shard.meta.get("plan") != self.plan.to_dict():
            raise ShardPlanError(f"the shard is not rank {r.rank} of plan {self.plan.plan_id}")
        options = EngineOptions(
            n_ctx=self.plan.n_ctx,
            threads=default_threads(self.settings.n_threads),
            accuracy_level=r.accuracy_level,
            memory_budget=self.settings.effective_memory_budget(),
            spill_dir=Path(self.settings.cache_dir) / "tp-spill",
        )
        return RankCompute.from_shard(shard, options)

    def abort(self) -> None:
        """Stop the session from another thread (node shutdown): its blocked calls raise."""
        self._aborted.set()
        with self._lock:
            collective = self.collective
        if collective is not None:
            collective.close()


class TensorParallelService:
    """Tensor-parallel joins (worker side) and tp-star streams (master side); the overlay's
    ``TensorParallelPort``.

    Args:
        settings: the node's settings.
        swarm: the swarm (this node's peer ID, the libp2p fallback of the star).

    Use as ``async with``: :attr:`running` inside; on exit stops every worker session and waits for
    their threads. The node registers it with the overlay while it runs.
    """

    def __init__(self, settings: Settings, swarm: SwarmPort) -> None:
        self.settings = settings
        self.swarm = swarm
        self.pending: dict[str, PendingJoin] = {}
        self.sessions: dict[str, WorkerSession] = {}
        self.running = False
        self._tasks = TaskOwner("tensor-parallel")
        self._running: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TensorParallelService:
        await self._tasks.__aenter__()
        self.running = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.running = False
        for session in list(self.sessions.values()):
            session.abort()
        live = [t for t in self._running if not t.done()]
        if live:
            await asyncio.wait(live, timeout=_STOP_GRACE_S)
        await self._tasks.__aexit__(None, None, None)

    # ------------------------------------------------------------------ worker side
    async def join(self, peer: PeerId, request: bytes) -> bytes:
        """RPC ``tp_join`` from ``peer`` (admitted), as the overlay carries it: :meth:`accept_join`
        on the validated payload.

        Args:
            peer: the master.
            request: msgpack of a :class:`TpJoinRequest`.

        Returns:
            msgpack of the :class:`TpJoinReply`.

        Raises:
            ProtocolViolation: the payload fails the schema.
            PeerRefused: as :meth:`accept_join`.
        """
        reply = await self.accept_join(peer, TpJoinRequest.from_msgpack(request))
        return reply.to_msgpack()

    async def accept_join(self, peer: PeerId, request: TpJoinRequest) -> TpJoinReply:
        """Accept the work ``peer`` offers or refuse it; an accepted session starts at once.

        Raises:
            PeerRefused: ``tp_worker`` is off, no session slot is free, the plan is malformed or
                not meant for us, or our memory budget cannot hold the share's KV cache and one layer.
        """
        s = self.settings
        if not s.tp_worker:
            raise PeerRefused("this node does not take tensor-parallel work (tp_worker is off)")
        if len(self.sessions) >= s.tp_max_sessions:
            raise PeerRefused(f"this node already serves {len(self.sessions)} tensor-parallel sessions")
        if request.session in self.sessions:
            raise PeerRefused("this session is already joined")
        try:
            plan = ShardPlan.from_msgpack(request.plan)
        except ShardPlanError as exc:
            raise PeerRefused(f"unusable plan: {exc}") from exc
        if plan.world_size != request.world_size or request.rank >= plan.world_size:
            raise PeerRefused("the plan does not match the requested rank and world size")
        share = plan.shares[request.rank]
        if share.node_id != self.swarm.peer_id:
            raise PeerRefused(f"rank {request.rank} of this plan belongs to {share.node_id}, not to this node")
        free = int(psutil.virtual_memory().available)
        budget = s.effective_memory_budget()
        sizing = rank_sizing(plan, request.rank, budget)
        if sizing.window < 1:
            raise PeerRefused(
                f"the share needs {sizing.needed / 2**20:.0f} MiB resident (its KV cache and one layer); this "
                f"node's memory budget is {budget / 2**20:.0f} MiB ({free / 2**20:.0f} MiB free)"
            )
        if not request.star_addrs and request.transport == "tcp":
            raise PeerRefused("no star address to connect to")
        session = WorkerSession(request, plan, peer, s, self.swarm)
        self.sessions[request.session] = session
        task = self._tasks.start(self._run(session), f"tp-worker-{request.session[:8]}")
        self._running.append(task)
        log.info(
            "tensor-parallel: joining %s (%.1f MB share, %d of %d layers resident)",
            session.name,
            share.est_bytes / 1e6,
            sizing.window,
            sizing.layers,
        )
        return TpJoinReply(session=request.session, free_ram=free)

    async def _run(self, session: WorkerSession) -> None:
        try:
            await asyncio.to_thread(session.run)
        finally:
            self.sessions.pop(session.request.session, None)
            self._running = [t for t in self._running if not t.done()]

    # ------------------------------------------------------------------ master side
    async def accept_stream(self, peer: PeerId, session: str, rank: int, stream: ByteStream) -> None:
        """Deliver a worker's tp-star stream to the group forming under ``session``.

        Args:
            peer: the worker.
            session / rank: what the stream's hello claims (validated by the overlay).
            stream: the stream, ready for the star's binary frames.

        Raises:
            PeerRefused: no such group is forming, or ``peer`` was not invited as ``rank``.
        """
        pending = self.pending.get(session)
        if pending is None:
            raise PeerRefused("no tensor-parallel group is forming under this session")
        pending.offer_stream(peer, rank, FrameChannel(stream))
