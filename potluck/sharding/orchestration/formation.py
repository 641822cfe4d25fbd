"""Forming one tensor-parallel group over chosen swarm peers (the master's side, one attempt).

:func:`form_group` (TPI-LLM, Li et al. 2024, §3; the ARCHITECTURE's "Tensor parallelism"):

1. plan the split over the members' advertised free RAM and speed
   (:func:`potluck.sharding.format.plan.make_plan`);
2. write each worker's shard file and hash it into a content-addressed manifest;
3. ask every worker over the admitted, Noise-encrypted RPC ``tp_join``
   (:meth:`~potluck.sharding.orchestration.ports.SwarmPort.invite`), which carries the random
   per-session star key (never a command line);
4. admit the workers into a :class:`~potluck.sharding.collective.star.StarMaster` as they arrive,
   over direct TCP to our listener or over ``/potluck/tp-star/1`` libp2p streams (the fallback);
5. serve each worker its shard over its authenticated star channel
   (:func:`potluck.sharding.collective.transfer.serve_shards`; workers cache by (model SHA-256, plan hash));
6. the ready barrier (:func:`~potluck.sharding.orchestration.readiness.ready_barrier`) once every
   worker has loaded its shard.

A worker that refuses, cannot be reached or fails on the way raises :class:`JoinFailed` naming its
rank; :class:`~potluck.sharding.orchestration.swarm.SwarmGroup` re-forms without it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader

from potluck.errors import NetworkError, PeerFailed, ProtocolViolation
from potluck.identity import PeerId
from potluck.sharding.collective import transfer
from potluck.sharding.collective.auth import new_session_key
from potluck.sharding.collective.star import DEFAULT_POLL_S, StarMaster
from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.format.plan import NodeCapability, ShardPlan
from potluck.sharding.orchestration.context import SwarmContext
from potluck.sharding.orchestration.group import plan_for
from potluck.sharding.orchestration.launch import master_shard, write_worker_shards
from potluck.sharding.orchestration.messages import TpJoinReply, TpJoinRequest
from potluck.sharding.orchestration.pending import POLL_S, PendingJoin, accept_loop
from potluck.sharding.orchestration.ports import SwarmPort
from potluck.sharding.orchestration.readiness import ready_barrier
from potluck.sharding.orchestration.selection import Candidate

log = logging.getLogger(__name__)

#: Longest each step of a ``tp_join`` (admission, then the RPC) may take, seconds.
INVITE_TIMEOUT_S = 30.0


class JoinFailed(Exception):
    """A worker failed while the group was forming (internal: ``SwarmGroup`` re-forms without it).

    Attributes:
        rank: the failed worker's rank (1-based; ``workers[rank - 1]``).
    """

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass
class FormedGroup:
    """A group that is up: the master's engine, the star (``None`` alone), the plan.

    Attributes:
        transport_used: rank -> ``tcp`` or ``libp2p``, how that worker reached the star.
    """

    master: TPMaster
    star: StarMaster | None
    plan: ShardPlan
    transport_used: dict[int, str] = field(default_factory=dict)


def form_group(
    ctx: SwarmContext,
    reader: GGUFReader,
    path: Path,
    n_ctx: int,
    model_sha256: str,
    nodes: list[NodeCapability],
    workers: list[Candidate],
) -> FormedGroup:
    """Plan over ``nodes`` (master first, then ``workers`` in order) and bring the group up.

    Args:
        ctx: the node-side context.
        reader / path: the model's GGUF.
        n_ctx: KV-cache length of every rank, tokens.
        model_sha256: hex SHA-256 of the GGUF (names the workers' shard cache).
        nodes: the planner's inputs (see ``selection.capabilities``).
        workers: the chosen workers; worker ``i`` becomes rank ``i + 1``.

    Raises:
        JoinFailed: a worker refused, could not be reached, or failed while joining or loading.
        ShardPlanError: the members cannot hold the model.
        ProtocolViolation: the ready barrier summed to garbage.
        ClosedError: the node is shutting down.
    """
    plan = plan_for(reader, path, nodes, n_ctx)
    n = plan.world_size
    options = EngineOptions(
        n_ctx=n_ctx,
        threads=ctx.threads,
        accuracy_level=ctx.accuracy_level,
        memory_budget=ctx.memory_budget,
        spill_dir=ctx.spill_dir,
    )
    shard0 = master_shard(reader, plan, ctx.shard_dir)
    compute = RankCompute.from_shard(shard0, options)
    if n == 1:
        return FormedGroup(TPMaster(compute, shard0, None), None, plan)
    paths = write_worker_shards(reader, plan, ctx.shard_dir)
    manifests = [_manifest(ctx, p) for p in paths]
    key = new_session_key()
    session = secrets.token_hex(16)
    # The star's own listener stays on loopback and unused: workers arrive through ours.
    # one rank per node: each has its node's cores, so receives busy-poll before they block
    star = StarMaster(n, key, host="127.0.0.1", port=0, timeout_s=ctx.timeout_s, poll_s=DEFAULT_POLL_S)
    pending = PendingJoin(session, {r: w.peer_id for r, w in enumerate(workers, start=1)})
    listener = socket.create_server((ctx.bind_host, 0), backlog=max(8, n))
    stop = threading.Event()
    acceptor = threading.Thread(target=accept_loop, args=(listener, pending, stop), name="tp-accept", daemon=True)
    ctx.registry[session] = pending
    acceptor.start()
    try:
        addrs = _star_addrs(ctx, listener.getsockname()[1])
        requests = [
            TpJoinRequest(
                session=session,
                model=path.name[:256],
                rank=rank,
                world_size=n,
                plan=plan.to_msgpack(),
                model_sha256=model_sha256,
                plan_hash=f"{plan.plan_id}-r{rank}",
                shard_sha256=manifests[rank - 1].file_sha256,
                shard_bytes=manifests[rank - 1].total_size,
                key=key,
                star_addrs=tuple(addrs),
                transport=ctx.transport,  # type: ignore[arg-type]
                timeout_s=ctx.timeout_s,
                accuracy_level=ctx.accuracy_level,
            )
            for rank in range(1, n)
        ]
        _invite(ctx, workers, requests)
        used: dict[int, str] = {}
        _admit_all(ctx, star, pending, n, used)
        _serve_shards(ctx, star, plan, model_sha256, paths, manifests)
        try:
            ready_barrier(star, 0, n, ctx.join_timeout_s, ctx.timeout_s)
        except PeerFailed as exc:
            raise JoinFailed(exc.rank, f"rank {exc.rank} failed while loading its shard: {exc}") from exc
    except BaseException:
        star.close()
        raise
    finally:
        del ctx.registry[session]
        stop.set()
        acceptor.join()
        listener.close()
        pending.close_leftovers()
    return FormedGroup(TPMaster(compute, shard0, star), star, plan, used)


def _manifest(ctx: SwarmContext, path: Path) -> transfer.Manifest:
    manifest = ctx.manifests.get(path)
    if manifest is None or manifest.total_size != path.stat().st_size:
        manifest = ctx.manifests[path] = transfer.build_manifest(path)
    return manifest


def _star_addrs(ctx: SwarmContext, port: int) -> list[tuple[str, int]]:
    host = ctx.bind_host
    if host not in ("0.0.0.0", "::", ""):
        return [(host, port)]
    return [(ip, port) for ip in ctx.overlay.listen_ips()[:16]]


def _invite(ctx: SwarmContext, workers: list[Candidate], requests: list[TpJoinRequest]) -> None:
    results = ctx.call(_invite_all(ctx.overlay, workers, requests), INVITE_TIMEOUT_S + 5)
    for rank, result in enumerate(results, start=1):
        if isinstance(result, BaseException):
            raise JoinFailed(rank, f"tp_join refused or failed: {result}")


async def _invite_all(
    swarm: SwarmPort, workers: list[Candidate], requests: list[TpJoinRequest]
) -> list[TpJoinReply | BaseException]:
    async def one(peer: PeerId, request: TpJoinRequest) -> TpJoinReply:
        payload = await swarm.invite(peer, request.to_msgpack(), INVITE_TIMEOUT_S)
        reply = TpJoinReply.from_msgpack(payload)
        if reply.session != request.session:
            raise ProtocolViolation(f"peer {peer} answered tp_join for another session")
        return reply

    calls = [one(w.peer_id, r) for w, r in zip(workers, requests, strict=True)]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def _admit_all(ctx: SwarmContext, star: StarMaster, pending: PendingJoin, n: int, used: dict[int, str]) -> None:
    deadline = time.monotonic() + ctx.join_timeout_s
    joined: set[int] = set()
    while len(joined) < n - 1:
        ctx.check_stop()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(1, n)) - joined)
            raise JoinFailed(missing[0], f"ranks {missing} did not connect within {ctx.join_timeout_s} s")
        try:
            channel = pending.channels.get(timeout=min(remaining, POLL_S))
        except queue.Empty:
            continue
        rank = star.admit(channel, timeout_s=ctx.timeout_s)
        if rank is not None:
            joined.add(rank)
            used[rank] = "libp2p" if str(channel.peer).startswith("libp2p:") else "tcp"


def _serve_shards(
    ctx: SwarmContext,
    star: StarMaster,
    plan: ShardPlan,
    model_sha256: str,
    paths: list[Path],
    manifests: list[transfer.Manifest],
) -> None:
    errors: dict[int, BaseException] = {}

    def serve(rank: int) -> None:
        shards = {(model_sha256, f"{plan.plan_id}-r{rank}"): (paths[rank - 1], manifests[rank - 1])}
        try:
            sent = transfer.serve_shards(star.channel(rank), shards, timeout_s=max(30.0, ctx.timeout_s))
            log.info("rank %d: shard served (%d chunks sent)", rank, sent)
        except (NetworkError, OSError) as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=serve, args=(r,), name=f"tp-shard-{r}") for r in range(1, plan.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank, exc in sorted(errors.items()):
        raise JoinFailed(rank, f"shard transfer to rank {rank} failed: {exc}")
