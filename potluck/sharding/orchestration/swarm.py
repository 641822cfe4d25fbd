"""A tensor-parallel group formed from peers of the swarm (the master's side).

:class:`SwarmGroup` is a :class:`~potluck.sharding.orchestration.group.TPGroup` whose workers are other potluck
nodes. Forming it (TPI-LLM, Li et al. 2024, §3; the ARCHITECTURE's "Tensor parallelism"):

1. pick workers from the signed cluster state: live records of this swarm's peers, not excluded
   for recent failures, ranked by lowest RTT, then highest measured speed, then most free RAM
   (:func:`rank_candidates`);
2. plan the split over their advertised free RAM and speed (:func:`potluck.sharding.format.plan.make_plan`);
3. write each worker's shard file and hash it into a content-addressed manifest;
4. ask every worker over the admitted, Noise-encrypted RPC ``tp_join``, which carries the random
   per-session star key (never a command line);
5. admit the workers into a :class:`~potluck.sharding.collective.star.StarMaster` as they arrive, over direct
   TCP to our listener or over ``/potluck/tp-star/1`` libp2p streams (the fallback), through
   ``StarMaster.admit``;
6. serve each worker its shard over its authenticated star channel
   (:func:`potluck.sharding.collective.transfer.serve_shards`; workers keep a cache by (model hash, plan hash));
7. a ready barrier (one all-reduce with the join deadline) once every worker has loaded its shard.

A worker that refuses, cannot be reached or fails while joining is excluded (capped backoff in the
overlay) and the group is re-formed without it. A worker that fails later raises
:class:`~potluck.errors.PeerFailed` in the engine; :meth:`SwarmGroup.recover` re-plans over the
survivors (topped up from the swarm when it can), down to the master alone when it can hold the
model, and :func:`~potluck.sharding.orchestration.group.generate_ids` replays the request.

Threads: the group is driven from one blocking thread (the backend's load and generation thread);
overlay calls cross to the node's asyncio loop with ``asyncio.run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import queue
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from potluck.errors import (
    ClosedError,
    ConnectError,
    GenerationError,
    NetworkError,
    PeerFailed,
    PeerRefused,
    PotluckError,
    ShardPlanError,
)
from potluck.retry import Backoff, RetryPolicy
from potluck.sharding.collective import transfer
from potluck.sharding.collective.auth import new_session_key
from potluck.sharding.collective.channel import FrameChannel, SocketStream, configure_socket
from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.format.extract import extract_shard
from potluck.sharding.format.gguf_tensors import open_gguf
from potluck.sharding.format.plan import NodeCapability, ShardPlan
from potluck.sharding.orchestration.group import plan_for
from potluck.sharding.orchestration.launch import write_worker_shards
from potluck.sharding.orchestration.remote import PendingJoin

log = logging.getLogger(__name__)

#: Longest a tp_join RPC round (all workers asked at once) may take, seconds.
INVITE_TIMEOUT_S = 30.0
#: Re-formations tried when workers refuse or fail while joining.
MAX_FORM_ATTEMPTS = 4
_POLL_S = 0.5


@dataclass(frozen=True)
class Candidate:
    """A peer that could be a worker, as the cluster state and our link measurements describe it.

    Attributes:
        peer_id: its libp2p peer ID.
        ram_free: free RAM it advertises, bytes.
        decode_tps: decode tokens/s it measured on its own model (0: unknown).
        cores: CPU cores it advertises.
        rtt_s: our measured round trip to it, seconds (``None``: not measured yet).
    """

    peer_id: str
    ram_free: int
    decode_tps: float
    cores: int
    rtt_s: float | None


def rank_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best first: lowest RTT (unmeasured last), then highest measured speed, then most free RAM."""
    return sorted(
        candidates,
        key=lambda c: (math.inf if c.rtt_s is None else c.rtt_s, -c.decode_tps, -c.ram_free, c.peer_id),
    )


def capabilities(me: Candidate, workers: Sequence[Candidate]) -> list[NodeCapability]:
    """Planner inputs, master first. Speeds are the measured decode tokens/s when every member has
    one (they are then comparable enough to split by), else the core counts."""
    members = [me, *workers]
    by_tps = all(m.decode_tps > 0 for m in members)
    return [NodeCapability(m.peer_id, m.ram_free, m.decode_tps if by_tps else float(max(1, m.cores))) for m in members]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the model's content address)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


class _JoinFailed(Exception):
    """A worker failed while the group was forming (internal: :meth:`SwarmGroup._start` catches it)."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass
class SwarmContext:
    """What a :class:`SwarmGroup` needs of the node.

    Attributes:
        overlay: the node's ``OverlayService`` (state, links, admission, bridge, p2p host).
        loop: the node's asyncio loop (overlay calls run there).
        registry: session id -> :class:`PendingJoin` (where tp-star streams are delivered).
        bind_host: where the star listens for workers' direct TCP connections.
        shard_dir: where the master writes worker shard files.
        transport: ``auto`` / ``tcp`` / ``libp2p`` (told to workers).
        timeout_s: all-reduce deadline.
        join_timeout_s: deadline to find workers and have them joined and loaded.
        threads: ONNX Runtime threads of the master's rank.
    """

    overlay: Any
    loop: asyncio.AbstractEventLoop
    registry: dict[str, PendingJoin]
    bind_host: str
    shard_dir: Path
    transport: str = "auto"
    timeout_s: float = 10.0
    join_timeout_s: float = 120.0
    threads: int = 1
    accuracy_level: int = 4
    manifests: dict[Path, transfer.Manifest] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the node shuts down

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise ClosedError("the node is shutting down")

    def call(self, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the node's loop from this (non-loop) thread and wait for its result."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError as exc:
            fut.cancel()
            raise ConnectError(f"overlay call timed out after {timeout} s") from exc


class SwarmGroup:
    """Master in this node, workers on swarm peers (see the module docstring).

    Args:
        ctx: the node-side context.
        model_path: the GGUF (only the master needs it).
        n_ctx: KV-cache length of every rank, tokens.
        world_size: ranks wanted, master included (>= 1; 0: as few as the memory check needs).

    Raises:
        ShardPlanError: not enough willing peers, or their memory cannot hold the model.
        GenerationError: the group could not be formed.
    """

    def __init__(self, ctx: SwarmContext, model_path: Path, n_ctx: int, world_size: int) -> None:
        self.ctx = ctx
        self.path = Path(model_path)
        self.reader = open_gguf(self.path)
        self.n_ctx = n_ctx
        self.want = world_size
        self.model_hash = file_sha256(self.path)[:32]
        self.workers: list[Candidate] = []
        self.star: Any = None
        self.plan: ShardPlan | None = None
        self.transport_used: dict[int, str] = {}
        self._master = self._start(initial=True)

    @property
    def master(self) -> TPMaster:
        return self._master

    @property
    def world_size(self) -> int:
        return 1 + len(self.workers)

    # ------------------------------------------------------------------ choosing workers
    def _me(self) -> Candidate:
        overlay = self.ctx.overlay
        hw = overlay.local.hardware()
        return Candidate(overlay.peer_id, int(psutil.virtual_memory().available), hw.decode_tps, hw.cores, 0.0)

    async def _snapshot(self) -> list[Candidate]:
        overlay = self.ctx.overlay
        out = []
        for signed in overlay.state.records():
            peer = signed.peer_id
            if peer == overlay.peer_id or overlay.is_excluded(peer):
                continue  # a peer we are not connected to is dialled and admitted before tp_join
            hw = signed.record.hardware
            link = overlay.links.get(peer)
            out.append(Candidate(peer, hw.ram_free, hw.decode_tps, hw.cores, link.rtt_s if link else None))
        return out

    def _fits(self, workers: Sequence[Candidate]) -> bool:
        try:
            plan_for(self.reader, self.path, capabilities(self._me(), workers), self.n_ctx)
        except ShardPlanError:
            return False
        return True

    def _choose(self, keep: list[Candidate], wait: bool) -> list[Candidate]:
        """``keep`` topped up with the best other candidates, up to ``want - 1`` workers (or, with
        ``want == 0``, up to the fewest that make the plan fit). With ``wait``, polls the cluster
        state until enough candidates are there or the join deadline passes.

        Raises:
            ShardPlanError: not enough candidates before the deadline.
        """
        deadline = time.monotonic() + self.ctx.join_timeout_s
        kept = {c.peer_id for c in keep}
        while True:
            self.ctx.check_stop()
            others = [c for c in rank_candidates(self.ctx.call(self._snapshot(), 10.0)) if c.peer_id not in kept]
            if self.want >= 1:
                chosen = keep + others[: max(0, self.want - 1 - len(keep))]
                if len(chosen) >= self.want - 1 or not wait:
                    return chosen
            else:
                for n in range(len(keep), len(keep) + len(others) + 1):
                    chosen = keep + others[: n - len(keep)]
                    if self._fits(chosen):
                        return chosen
                if not wait:
                    return keep + others
            if time.monotonic() >= deadline:
                found = len(keep) + len(others)
                raise ShardPlanError(
                    f"found {found} willing tensor-parallel peer(s) in the swarm within "
                    f"{self.ctx.join_timeout_s:.0f} s; the group needs "
                    + (f"{self.want - 1}" if self.want >= 1 else "more memory than they offer")
                )
            time.sleep(_POLL_S)

    # ------------------------------------------------------------------ forming the group
    def _start(self, initial: bool, keep: list[Candidate] | None = None) -> TPMaster:
        workers = self._choose(keep or [], wait=initial)
        # 0.2 s, 0.4 s, 0.8 s between the attempts (potluck.retry); only a failed join is retried.
        policy = RetryPolicy(Backoff(first_s=0.2, max_s=1.0), attempts=MAX_FORM_ATTEMPTS, retry_on=(_JoinFailed,))
        try:
            for attempt in policy.retrying(log, "forming the tensor-parallel group"):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        # Forming: wait for a replacement (an explicit --tensor-parallel N means N ranks).
                        # Recovering mid-request: go on with whoever is there now.
                        workers = self._choose(workers, wait=initial)
                    try:
                        return self._form(workers)
                    except _JoinFailed as exc:
                        failed = workers[exc.rank - 1]
                        log.warning("tensor-parallel peer %s failed to join (%s); re-forming without it",
                                    failed.peer_id, exc)  # fmt: skip
                        self.ctx.loop.call_soon_threadsafe(self.ctx.overlay.record_failure, failed.peer_id)
                        workers = [w for w in workers if w.peer_id != failed.peer_id]
                        raise
        except _JoinFailed as exc:
            raise GenerationError(f"no tensor-parallel group formed after {MAX_FORM_ATTEMPTS} attempts") from exc
        raise AssertionError("unreachable")

    def _form(self, workers: list[Candidate]) -> TPMaster:
        ctx = self.ctx
        plan = plan_for(self.reader, self.path, capabilities(self._me(), workers), self.n_ctx)
        n = plan.world_size
        options = EngineOptions(n_ctx=self.n_ctx, threads=ctx.threads, accuracy_level=ctx.accuracy_level)
        shard0 = extract_shard(self.reader, plan, 0)
        compute = RankCompute.from_shard(shard0, options)
        if n == 1:
            self.workers, self.plan, self.star = [], plan, None
            log.info("tensor-parallel group up: 1 rank (the master alone), plan %s", plan.plan_id)
            return TPMaster(compute, shard0, None)
        paths = write_worker_shards(self.reader, plan, ctx.shard_dir)
        manifests = [self._manifest(p) for p in paths]
        from potluck.sharding.collective.star import StarMaster

        key = new_session_key()
        session = secrets.token_hex(16)
        # The star's own listener stays on loopback and unused: workers arrive through ours.
        star = StarMaster(n, key, host="127.0.0.1", port=0, timeout_s=ctx.timeout_s)
        pending = PendingJoin(session, {r: w.peer_id for r, w in enumerate(workers, start=1)})
        listener = socket.create_server((ctx.bind_host, 0), backlog=max(8, n))
        stop = threading.Event()
        acceptor = threading.Thread(target=_accept_loop, args=(listener, pending, stop), name="tp-accept", daemon=True)
        ctx.registry[session] = pending
        acceptor.start()
        try:
            addrs = self._star_addrs(listener.getsockname()[1])
            self._invite(session, plan, workers, key, addrs, manifests)
            self._admit_all(star, pending, n)
            self._serve_shards(star, plan, paths, manifests)
            self._barrier(star, n)
        except BaseException:
            star.close()
            raise
        finally:
            del ctx.registry[session]
            stop.set()
            acceptor.join()
            listener.close()
            pending.close_leftovers()
        self.workers, self.plan, self.star = workers, plan, star
        log.info(
            "tensor-parallel group up: %d ranks (%s), plan %s",
            n,
            ", ".join(f"rank {r} {w.peer_id[-8:]} via {self.transport_used.get(r)}" for r, w in enumerate(workers, 1)),
            plan.plan_id,
        )
        return TPMaster(compute, shard0, star)

    def _manifest(self, path: Path) -> transfer.Manifest:
        manifest = self.ctx.manifests.get(path)
        if manifest is None or manifest.total_size != path.stat().st_size:
            manifest = self.ctx.manifests[path] = transfer.build_manifest(path)
        return manifest

    def _star_addrs(self, port: int) -> list[tuple[str, int]]:
        host = self.ctx.bind_host
        if host not in ("0.0.0.0", "::", ""):
            return [(host, port)]
        ips: list[str] = []
        for addr in self.ctx.overlay.addrs:
            parts = addr.split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and "p2p-circuit" not in parts and parts[2] not in ips:
                ips.append(parts[2])
        return [(ip, port) for ip in ips[:16]]

    def _invite(
        self,
        session: str,
        plan: ShardPlan,
        workers: list[Candidate],
        key: bytes,
        addrs: list[tuple[str, int]],
        manifests: list[transfer.Manifest],
    ) -> None:
        from potluck.overlay.wire import TpJoinRequest

        packed = plan.to_msgpack()
        requests = [
            TpJoinRequest(
                session=session,
                model=self.path.name[:256],
                rank=rank,
                world_size=plan.world_size,
                plan=packed,
                model_hash=self.model_hash,
                plan_hash=f"{plan.plan_id}-r{rank}",
                shard_sha256=manifests[rank - 1].file_sha256,
                shard_bytes=manifests[rank - 1].total_size,
                key=key,
                star_addrs=tuple(addrs),
                transport=self.ctx.transport,  # type: ignore[arg-type]
                timeout_s=self.ctx.timeout_s,
                accuracy_level=self.ctx.accuracy_level,
            )
            for rank in range(1, plan.world_size)
        ]
        results = self.ctx.call(_invite_all(self.ctx.overlay, workers, requests), INVITE_TIMEOUT_S + 5)
        for rank, result in enumerate(results, start=1):
            if isinstance(result, BaseException):
                raise _JoinFailed(rank, f"tp_join refused or failed: {result}")

    def _admit_all(self, star: Any, pending: PendingJoin, n: int) -> None:
        deadline = time.monotonic() + self.ctx.join_timeout_s
        joined: set[int] = set()
        while len(joined) < n - 1:
            self.ctx.check_stop()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, n)) - joined)
                raise _JoinFailed(missing[0], f"ranks {missing} did not connect within {self.ctx.join_timeout_s} s")
            try:
                channel = pending.channels.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                continue
            rank = star.admit(channel, timeout_s=self.ctx.timeout_s)
            if rank is not None:
                joined.add(rank)
                self.transport_used[rank] = "libp2p" if str(channel.peer).startswith("libp2p:") else "tcp"

    def _serve_shards(self, star: Any, plan: ShardPlan, paths: list[Path], manifests: list[transfer.Manifest]) -> None:
        errors: dict[int, BaseException] = {}

        def serve(rank: int) -> None:
            shards = {(self.model_hash, f"{plan.plan_id}-r{rank}"): (paths[rank - 1], manifests[rank - 1])}
            try:
                sent = transfer.serve_shards(star.channel(rank), shards, timeout_s=max(30.0, self.ctx.timeout_s))
                log.info("rank %d: shard served (%d chunks sent)", rank, sent)
            except (NetworkError, OSError) as exc:
                errors[rank] = exc

        threads = [threading.Thread(target=serve, args=(r,), name=f"tp-shard-{r}") for r in range(1, plan.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for rank, exc in sorted(errors.items()):
            raise _JoinFailed(rank, f"shard transfer to rank {rank} failed: {exc}")

    def _barrier(self, star: Any, n: int) -> None:
        """Every worker all-reduces a one-hot vector once its shard is loaded: all ones = ready."""
        vec = np.zeros(n, np.float32)
        vec[0] = 1.0
        star.timeout_s = self.ctx.join_timeout_s  # loading a shard may take long; the op itself is tiny
        try:
            total = star.all_reduce(vec)
        except PeerFailed as exc:
            raise _JoinFailed(exc.rank, f"rank {exc.rank} failed while loading its shard: {exc}") from exc
        finally:
            star.timeout_s = self.ctx.timeout_s
        if not np.array_equal(total, np.ones(n, np.float32)):
            raise GenerationError(f"ready barrier summed to {total.tolist()}, not all ones")

    # ------------------------------------------------------------------ failures
    def recover(self, failure: PeerFailed) -> TPMaster:
        """Drop the failed worker, re-plan over the survivors (topped up from the swarm when
        possible, down to the master alone) and return the new master.

        Raises:
            GenerationError: no group can be formed (e.g. the master alone cannot hold the model).
        """
        if not 0 < failure.rank <= len(self.workers):
            raise GenerationError(f"cannot recover from a failure of rank {failure.rank}") from failure
        failed = self.workers[failure.rank - 1]
        log.warning("tensor-parallel rank %d (%s) failed: %s; re-planning", failure.rank, failed.peer_id, failure)
        self.ctx.loop.call_soon_threadsafe(self.ctx.overlay.record_failure, failed.peer_id)
        survivors = [w for w in self.workers if w.peer_id != failed.peer_id]
        self._stop()
        try:
            self._master = self._start(initial=False, keep=survivors)
        except ShardPlanError as exc:
            raise GenerationError(f"no tensor-parallel group can be re-formed: {exc}") from exc
        return self._master

    def _stop(self) -> None:
        if self.star is not None:
            self.star.close()  # survivors' sessions end on the CLOSE frame
            self.star = None
        self.workers = []

    def close(self) -> None:
        """Tell the workers to stop and close the star (best effort)."""
        try:
            self._master.shutdown()
        except PotluckError as exc:
            log.debug("tensor-parallel shutdown: %s", exc)
        self._stop()


async def _invite_all(overlay: Any, workers: list[Candidate], requests: list[Any]) -> list[Any]:
    from potluck.overlay import rpc

    async def one(peer: str, request: Any) -> Any:
        await asyncio.wait_for(overlay.bridge.call(overlay.ensure_admitted, peer), INVITE_TIMEOUT_S)
        return await asyncio.wait_for(overlay.bridge.call(rpc.tp_join, overlay.p2p, peer, request), INVITE_TIMEOUT_S)

    calls = [one(w.peer_id, r) for w, r in zip(workers, requests, strict=True)]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def _accept_loop(listener: socket.socket, pending: PendingJoin, stop: threading.Event) -> None:
    """Accept workers' direct TCP connections and queue them for admission until ``stop``."""
    listener.settimeout(_POLL_S)
    while not stop.is_set():
        try:
            sock, addr = listener.accept()
        except TimeoutError:
            continue
        except OSError as exc:
            log.debug("tp accept loop ends: %s", exc)
            return
        configure_socket(sock)
        channel = FrameChannel(SocketStream(sock, peer=f"{addr[0]}:{addr[1]}"))
        try:
            pending.offer(channel)
        except PeerRefused:
            channel.close()
