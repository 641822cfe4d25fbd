"""Predicted ms/token of candidate tensor-parallel groups, from measured bandwidths (the planner's view).

For N = 1, 2, ... devices like this one (its measured memory and disk bandwidth, each with the same
memory budget), plan the model over N ranks (:func:`~potluck.sharding.orchestration.group.plan_for`),
size each rank's layer window under the budget (as :mod:`potluck.sharding.compute.residency`
would: the weights are estimated at 4/3 of the file's bytes once MLAS has prepacked them; the
master also holds the output head), and predict seconds per token with
:func:`potluck.sharding.format.cost.predict_s_per_token` for a given link. More devices mean smaller
shares (fewer streamed bytes) but two more all-reduce hops per layer on every token; on a slow link
the best group is often smaller than the largest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from potluck.errors import ShardPlanError
from potluck.sharding.format.cost import PREPACK_GROWTH, LinkCost, RankCost, predict_s_per_token
from potluck.sharding.format.extract import plan_geometry
from potluck.sharding.format.gguf_tensors import read_config, tensor_map
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.orchestration.group import plan_for

LINKS = {"wired": LinkCost(0.3e-3, 125e6), "wifi": LinkCost(3e-3, 12.5e6)}  # 1 Gbit/s, 100 Mbit/s


@dataclass(frozen=True)
class GroupForecast:
    """One candidate group.

    Attributes:
        nodes: ranks (devices).
        window: layers the tightest rank keeps resident (``layers``: all of them).
        layers: the model's layers.
        rank_mib: the largest rank's weights, MiB (prepacked estimate).
        s_per_token: predicted seconds per token on the link.
    """

    nodes: int
    window: int
    layers: int
    rank_mib: float
    s_per_token: float


def measure_memory_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes/s of one pass summing a float32 buffer (a rough stand-in for weight streaming)."""
    a = np.ones(nbytes // 4, np.float32)
    a.sum()  # fault the pages in
    t0 = time.perf_counter()
    a.sum()
    return nbytes / (time.perf_counter() - t0)


def measure_disk_bandwidth(path: Path, limit: int = 1 << 30, cold: bool = True) -> float:
    """Bytes/s of a sequential read of up to ``limit`` bytes of ``path`` (``cold``: its page cache
    dropped first; otherwise as cached)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0, n = time.perf_counter(), 0
        while n < limit and (chunk := os.read(fd, 8 << 20)):
            n += len(chunk)
        return n / max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)


def forecast(
    reader: GGUFReader,
    path: Path,
    n_ctx: int,
    budget: int,
    memory_bw: float,
    disk_bw: float,
    link: LinkCost,
    max_nodes: int,
) -> list[GroupForecast]:
    """Predictions for 1..``max_nodes`` devices (those the planner can split the model over).

    Raises:
        ShardPlanError: no group size can be planned (e.g. fewer KV heads than 1 per rank).
    """
    config = read_config(reader)
    t = tensor_map(reader)
    head = t.get("output.weight") or t["token_embd.weight"]
    head_bytes = int(head.n_bytes) * PREPACK_GROWTH
    master_extra = plan_geometry(reader, config, n_ctx).master_bytes  # embeddings, final norm, head
    out = []
    for n in range(1, max_nodes + 1):
        try:
            plan = plan_for(reader, path, [NodeCapability(f"d{i}", 1 << 50, 1.0) for i in range(n)], n_ctx)
        except ShardPlanError:
            continue
        ranks, windows, sizes = [], [], []
        for share in plan.shares:
            weights = (share.est_bytes - (master_extra if share.rank == 0 else 0)) * PREPACK_GROWTH
            per_layer = max(weights, 1.0) / config.n_layers
            fixed = head_bytes if share.rank == 0 else 0.0
            window = int(min(config.n_layers, max(0.0, (budget - fixed) // per_layer)))
            if window < 1:
                break
            windows.append(window)
            sizes.append(weights)
            streamed = (config.n_layers - window) * per_layer
            ranks.append(RankCost(window * per_layer + fixed, streamed, memory_bw, disk_bw))
        else:
            s = predict_s_per_token(ranks, config.n_layers, config.hidden, link if n > 1 else None)
            out.append(GroupForecast(n, min(windows), config.n_layers, max(sizes) / 2**20, s))
    if not out:
        raise ShardPlanError(f"no group of 1..{max_nodes} devices can hold a window of one layer per rank")
    return out
