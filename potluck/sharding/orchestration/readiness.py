"""The ready barrier of a tensor-parallel group: one all-reduce that every rank joins when loaded.

Rank ``r`` contributes the one-hot vector ``e_r`` of length ``world_size``; the star adds them, so
the sum is all ones exactly when every rank took part. The barrier runs under a longer deadline
than a forward pass (loading a shard may take long; the operation itself is tiny), then the
collective's per-operation deadline is restored. Used by the master when it forms a group
(:mod:`potluck.sharding.orchestration.formation`) and by every worker once its shard is compiled
(:mod:`potluck.sharding.orchestration.remote`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from potluck.errors import ProtocolViolation


class Reducer(Protocol):
    """The part of a star member the barrier uses (``StarMaster`` and ``StarWorker`` fit)."""

    timeout_s: float

    def all_reduce(self, array: np.ndarray) -> np.ndarray: ...


def ready_barrier(member: Reducer, rank: int, world_size: int, wait_s: float, then_s: float) -> None:
    """Block until every rank of the group is ready.

    Args:
        member: this rank's star member.
        rank: this rank (0: the master).
        world_size: ranks in the group.
        wait_s: deadline of the barrier, seconds (the slowest rank's load time).
        then_s: the per-operation deadline to restore afterwards, seconds.

    Raises:
        PeerFailed: (master) a worker failed or missed the deadline; ``rank`` says which.
        TransferError / ClosedError: (worker) the master went away or we were closed.
        ProtocolViolation: the sum was not all ones (a member contributed twice or garbage).
    """
    vec = np.zeros(world_size, np.float32)  # (world_size,)
    vec[rank] = 1.0
    member.timeout_s = wait_s
    try:
        total = member.all_reduce(vec)
    finally:
        member.timeout_s = then_s
    if not np.array_equal(total, np.ones(world_size, np.float32)):
        raise ProtocolViolation(f"ready barrier summed to {total.tolist()}, not all ones")
