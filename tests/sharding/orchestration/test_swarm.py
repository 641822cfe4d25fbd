"""Choosing tensor-parallel workers, the placement decision, and what a worker node accepts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from potluck.config import Settings
from potluck.errors import ConfigError, PeerRefused, ProtocolViolation
from potluck.sharding.collective.channel import FrameChannel
from potluck.sharding.format.gguf_tensors import open_gguf
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.orchestration.group import plan_for
from potluck.sharding.orchestration.messages import TpJoinReply, TpJoinRequest
from potluck.sharding.orchestration.pending import PendingJoin
from potluck.sharding.orchestration.placement import fits_locally, wants_tensor_parallel
from potluck.sharding.orchestration.remote import TensorParallelService
from potluck.sharding.orchestration.selection import Candidate, capabilities, rank_candidates


def cand(peer: str, rtt: float | None, tps: float = 0.0, ram: int = 1 << 30, cores: int = 2) -> Candidate:
    return Candidate(peer, ram, tps, cores, rtt)


def test_candidates_rank_by_rtt_then_speed_then_memory():
    ranked = rank_candidates(
        [
            cand("unmeasured", None, tps=999),
            cand("far", 0.050),
            cand("near-slow", 0.001, tps=10),
            cand("near-fast", 0.001, tps=50),
            cand("near-fast-big", 0.001, tps=50, ram=8 << 30),
        ]
    )
    assert [c.peer_id for c in ranked] == ["near-fast-big", "near-fast", "near-slow", "far", "unmeasured"]


def test_speeds_are_measured_tps_only_when_everyone_has_one():
    me = cand("me", 0.0, tps=40, cores=8)
    assert [c.speed for c in capabilities(me, [cand("a", 0.1, tps=20, cores=2)])] == [40, 20]
    assert [c.speed for c in capabilities(me, [cand("a", 0.1, tps=0, cores=2)])] == [8, 2]


def test_pending_join_takes_only_invited_streams():
    pending = PendingJoin("s" * 32, {1: "peer-a", 2: "peer-b"})

    class Closing:
        peer = "x"
        closed = False

        def close(self) -> None:
            self.closed = True

    stream = Closing()
    channel = FrameChannel(stream)
    with pytest.raises(PeerRefused):
        pending.offer_stream("peer-a", 2, channel)
    pending.offer_stream("peer-b", 2, channel)
    pending.close_leftovers()
    assert stream.closed


def test_placement_uses_the_planners_memory_check(model_path, tmp_path):
    path = model_path("f32")
    assert fits_locally(path, 256, free_ram=8 << 30)
    assert not fits_locally(path, 256, free_ram=4 << 20)
    assert not fits_locally(path, 256, free_ram=8 << 30, budget=4 << 20)  # a budget overrides free RAM
    assert fits_locally(path, 256, free_ram=4 << 20, budget=64 << 20)
    overlay = object()
    assert wants_tensor_parallel(Settings(tensor_parallel=3, data_dir=tmp_path), path, overlay)
    assert not wants_tensor_parallel(Settings(tensor_parallel=1, data_dir=tmp_path), path, overlay)
    assert not wants_tensor_parallel(Settings(tensor_parallel=0, data_dir=tmp_path), path, overlay)  # fits here
    assert not wants_tensor_parallel(Settings(tensor_parallel=0, data_dir=tmp_path), path, None)
    small = Settings(tensor_parallel=0, memory_budget="4MiB", data_dir=tmp_path)
    assert wants_tensor_parallel(small, path, overlay)  # larger than this node's budget: the swarm's
    with pytest.raises(ConfigError):
        wants_tensor_parallel(Settings(tensor_parallel=2, data_dir=tmp_path), path, None)


def join_request(path: Path, worker_id: str, ram: int = 8 << 30) -> TpJoinRequest:
    plan = plan_for(
        open_gguf(path), path, [NodeCapability("master", ram, 1.0), NodeCapability(worker_id, ram, 1.0)], 256
    )
    return TpJoinRequest(
        session="ab" * 16,
        model=path.name,
        rank=1,
        world_size=2,
        plan=plan.to_msgpack(),
        model_sha256="5" * 64,
        plan_hash=f"{plan.plan_id}-r1",
        shard_sha256="0" * 64,
        shard_bytes=1,
        key=b"k" * 32,
        star_addrs=(),
        transport="tcp",
        timeout_s=5.0,
        accuracy_level=4,
    )


@pytest.mark.parametrize(
    ("settings", "worker_id", "reason"),
    [
        ({"tp_worker": False}, "me", "does not take"),
        ({}, "someone-else", "belongs to"),
        ({}, "me", "no star address"),
    ],
)
def test_a_worker_refuses_work_it_should_not_take(model_path, tmp_path, settings, worker_id, reason):
    swarm = SimpleNamespace(peer_id="me")
    service = TensorParallelService(Settings(data_dir=tmp_path, **settings), swarm)
    request = join_request(model_path("f32"), worker_id)

    async def run() -> None:
        async with service:
            assert service.running
            with pytest.raises(PeerRefused, match=reason):
                await service.join("master-peer", request.to_msgpack())
        assert not service.running

    asyncio.run(run())


def test_a_worker_refuses_a_share_whose_kv_cache_and_one_layer_exceed_its_budget(model_path, tmp_path):
    swarm = SimpleNamespace(peer_id="me")
    service = TensorParallelService(Settings(data_dir=tmp_path), swarm)
    request = join_request(model_path("f32"), "me", ram=1 << 50)  # a plan that assumed a huge node
    big = request.model_copy(update={"star_addrs": (("127.0.0.1", 9),)})
    plan = plan_for(
        open_gguf(model_path("f32")),
        model_path("f32"),
        [NodeCapability("master", 1 << 50, 1.0), NodeCapability("me", 1 << 50, 1.0)],
        1 << 28,  # a KV cache of 268 M tokens: far more than any free RAM here
    )
    big = big.model_copy(update={"plan": plan.to_msgpack()})

    async def run() -> None:
        async with service:
            with pytest.raises(PeerRefused, match=r"one layer.*memory budget is"):
                await service.accept_join("master-peer", big)

    asyncio.run(run())


def test_a_worker_refuses_a_payload_that_fails_the_schema(tmp_path):
    service = TensorParallelService(Settings(data_dir=tmp_path), SimpleNamespace(peer_id="me"))
    reply = TpJoinReply(session="ab" * 16, free_ram=1)

    async def run() -> None:
        async with service:
            with pytest.raises(ProtocolViolation):
                await service.join("master-peer", reply.to_msgpack())  # a reply, not a request

    asyncio.run(run())


def test_recovery_goes_on_with_the_survivors_instead_of_topping_up_with_dead_peers():
    """A killed worker's record, and a stopped peer's, stay in the view until they expire: after
    a failed join, recovery retries with the members that did not fail (the CI failure where four
    attempts alternated between two dead peers)."""
    from potluck.sharding.orchestration.formation import JoinFailed
    from potluck.sharding.orchestration.swarm import SwarmGroup

    survivor, stale, also_stale = cand("survivor", 0.001), cand("stale", 0.002), cand("also-stale", 0.003)
    chosen: list[tuple[list[str], bool]] = []
    excluded: list[str] = []
    formed: list[list[str]] = []

    def choose(keep, wait):
        chosen.append(([c.peer_id for c in keep], wait))
        return [*keep, stale, also_stale][:2]  # the view still lists the dead: want = 3 ranks

    def form(workers):
        formed.append([w.peer_id for w in workers])
        for rank, w in enumerate(workers, 1):
            if w.peer_id != "survivor":
                raise JoinFailed(rank, "cannot reach")
        return "master"

    group = SwarmGroup.__new__(SwarmGroup)
    group.ctx = SimpleNamespace(
        loop=SimpleNamespace(call_soon_threadsafe=lambda fn, peer: excluded.append(peer)),
        overlay=SimpleNamespace(record_failure=None),
    )
    group.selector = SimpleNamespace(choose=choose)
    group._form = form
    assert group._start(initial=False, keep=[survivor]) == "master"
    assert formed == [["survivor", "stale"], ["survivor"]]
    assert chosen == [(["survivor"], False)]
    assert excluded == ["stale"]
