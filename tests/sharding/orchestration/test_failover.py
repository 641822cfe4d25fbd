"""Failure handling in-process: a worker dies or stalls mid-generation, the request still completes."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.errors import GenerationError, PeerFailed, TransferError
from potluck.routing.request import SamplingParams
from potluck.sharding.collective.in_process import LocalStar
from potluck.sharding.compute.engine import EngineOptions
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.orchestration.group import ThreadGroup, generate_ids
from tests.sharding.llama_ref import greedy_tokens


def nodes(n: int) -> list[NodeCapability]:
    return [NodeCapability(f"n{i}", 1 << 30, 1.0) for i in range(n)]


def test_local_star_sums_in_rank_order_and_reports_dead_ranks() -> None:
    import threading

    star = LocalStar(3, timeout_s=2.0)
    results: dict[int, np.ndarray] = {}

    def worker(rank: int) -> None:
        header, arr = star.members[rank].receive()
        assert header == {"op": "x"} and arr is not None
        results[rank] = star.members[rank].all_reduce(arr * rank)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    base = np.arange(4, dtype=np.float32)
    star.members[0].broadcast({"op": "x"}, base)
    total = star.members[0].all_reduce(base)
    for t in threads:
        t.join()
    np.testing.assert_array_equal(total, base * 4)
    np.testing.assert_array_equal(results[1], total)
    star.kill(2)
    with pytest.raises(PeerFailed) as info:
        star.members[0].broadcast({"op": "x"})
    assert info.value.rank == 2
    star.members[0].close()
    assert star.members[1].receive()[0] == {"op": "x"}  # sent before rank 2 was found dead
    with pytest.raises(TransferError):
        star.members[1].receive()


def test_stalled_worker_is_noticed_within_the_deadline() -> None:
    star = LocalStar(2, timeout_s=0.2)
    with pytest.raises(PeerFailed) as info:
        star.members[0].all_reduce(np.zeros(3, np.float32))  # rank 1 never answers
    assert info.value.rank == 1


@pytest.mark.parametrize("kill_after", [0, 7])
def test_worker_killed_mid_generation_request_completes(model_path, kill_after) -> None:
    path = model_path("f32")
    prompt_ids, want = greedy_tokens(path)
    group = ThreadGroup(path, nodes(3), EngineOptions(n_ctx=256, threads=1, spinning=False), timeout_s=2.0)
    got: list[int] = []
    try:
        if kill_after == 0:
            group.kill(2)  # dies before the prompt is even processed
        for token in generate_ids(group, prompt_ids, SamplingParams(max_tokens=48, temperature=0.0), set()):
            got.append(token)
            if len(got) == kill_after:
                group.kill(1)
        assert group.master.world_size == 2  # re-planned over the two survivors
    finally:
        group.close()
    assert got == want


def test_recovery_down_to_the_master_alone(model_path) -> None:
    path = model_path("f32")
    prompt_ids, want = greedy_tokens(path)
    group = ThreadGroup(path, nodes(2), EngineOptions(n_ctx=256, threads=1, spinning=False), timeout_s=2.0)
    got: list[int] = []
    try:
        for token in generate_ids(group, prompt_ids, SamplingParams(max_tokens=20, temperature=0.0), set()):
            got.append(token)
            if len(got) == 3:
                group.kill(1)
        assert group.master.world_size == 1
    finally:
        group.close()
    assert got == want[:20]


def test_master_failure_is_not_recoverable(model_path) -> None:
    group = ThreadGroup(model_path("f32"), nodes(2), EngineOptions(n_ctx=256, threads=1, spinning=False))
    try:
        with pytest.raises(GenerationError):
            group.recover(PeerFailed("master", rank=0))
    finally:
        group.close()
