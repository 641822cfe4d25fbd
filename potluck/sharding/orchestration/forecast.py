"""Predicted ms/token of candidate tensor-parallel groups, from measured bandwidths (the planner's view).

For a candidate group of devices (the live swarm's peers with the bandwidths and memory budgets
their signed records advertise, :mod:`potluck.sharding.orchestration.selection`; or, for
``potluck shard plan --predict``, N = 1, 2, ... devices like this one), plan the model over its
ranks by speed (:func:`~potluck.sharding.orchestration.group.plan_for` with memory caps lifted:
a share larger than the budget is streamed), size each rank's layer window under its budget (as
:mod:`potluck.sharding.compute.residency` would: the weights are estimated at 4/3 of the file's
bytes once MLAS has prepacked them; the KV cache and the rank's slice of the output head stay resident),
and predict seconds per token with :func:`potluck.sharding.format.cost.predict_s_per_token`. More
devices mean smaller shares (fewer streamed bytes) but two more all-reduce hops per layer on every
token; on a slow link the best group is often smaller than the largest.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader

from potluck.errors import ShardPlanError
from potluck.sharding.compute.onnx_ops import GraphBuilder, session_options
from potluck.sharding.format.cost import (
    DEFAULT_EXCHANGE_OVERHEAD_S,
    PREPACK_GROWTH,
    LinkCost,
    RankSizing,
    predict_s_per_token,
    rank_sizing,
)
from potluck.sharding.format.extract import plan_geometry
from potluck.sharding.format.gguf_tensors import read_config
from potluck.sharding.format.plan import DISK_BACKED, NodeCapability, PlanGeometry, make_plan
from potluck.sharding.orchestration.group import model_file_key

#: Link presets: 0.3 ms and 1 Gbit/s, 3 ms and 100 Mbit/s, each with the default exchange overhead.
LINKS = {
    "wired": LinkCost(0.3e-3, 125e6, DEFAULT_EXCHANGE_OVERHEAD_S),
    "wifi": LinkCost(3e-3, 12.5e6, DEFAULT_EXCHANGE_OVERHEAD_S),
}


@dataclass(frozen=True)
class Device:
    """A member of a candidate group, as measured or advertised.

    Attributes:
        name: peer ID (or any stable name).
        budget: resident bytes it gives its rank (weights + KV cache; 0: no limit).
        memory_bw: bytes/s it streams resident weights at.
        disk_bw: bytes/s it reads its spill files at.
        speed: the planner's split weight (measured tokens/s or cores; any consistent unit, > 0).
        rtt_s: round trip between it and the master, seconds (0 for the master).
    """

    name: str
    budget: int
    memory_bw: float
    disk_bw: float
    speed: float = 1.0
    rtt_s: float = 0.0


@dataclass(frozen=True)
class GroupForecast:
    """One candidate group.

    Attributes:
        nodes: ranks (devices).
        window: layers the tightest rank keeps resident (``layers``: all of them; 0: infeasible).
        layers: the model's layers.
        rank_mib: the largest rank's weights, MiB (prepacked estimate).
        s_per_token: predicted seconds per token (``inf`` when some rank cannot hold one layer).
        short: why the group is infeasible ("" when it is not): the member and the budget it needs.
        members: the devices' names, master first.
        sizings: each rank's weights, resident bytes and window, master first.
    """

    nodes: int
    window: int
    layers: int
    rank_mib: float
    s_per_token: float
    short: str = ""
    members: tuple[str, ...] = ()
    sizings: tuple[RankSizing, ...] = ()

    @property
    def feasible(self) -> bool:
        return not self.short

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the scalar fields, ``members``, and ``ranks`` (weights/fixed bytes, window)."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "sizings"}
        out["s_per_token"] = None if math.isinf(self.s_per_token) else self.s_per_token
        out["members"] = list(self.members)
        out["ranks"] = [{"weights": s.weights, "fixed": s.fixed, "window": s.window} for s in self.sizings]
        return out


@dataclass(frozen=True)
class ModelSizes:
    """What every forecast of one model needs, read from its GGUF once: the planner's geometry at
    ``n_ctx``, the query heads and the model id (the selector forecasts on every poll for peers)."""

    geometry: PlanGeometry
    n_heads: int
    model_id: str
    n_ctx: int

    @classmethod
    def of(cls, reader: GGUFReader, path: Path, n_ctx: int) -> ModelSizes:
        config = read_config(reader)
        return cls(plan_geometry(reader, config, n_ctx), config.n_heads, model_file_key(path), n_ctx)


def forecast_group(
    model: ModelSizes,
    devices: Sequence[Device],
    link_bandwidth: float,
    link_overhead: float = DEFAULT_EXCHANGE_OVERHEAD_S,
) -> GroupForecast:
    """Plan ``model`` over ``devices`` (master first; shares by speed, :data:`DISK_BACKED`), size
    each rank's window under its budget (:func:`~potluck.sharding.format.cost.rank_sizing`) and
    predict s/token (:func:`~potluck.sharding.format.cost.predict_s_per_token`) over links of the
    slowest member's RTT, ``link_bandwidth`` bytes/s and ``link_overhead`` s per exchange.

    Raises:
        ShardPlanError: the planner cannot split the model over this many ranks.
    """
    nodes = [NodeCapability(d.name, DISK_BACKED, d.speed) for d in devices]
    g = model.geometry
    plan = make_plan(g, nodes, model.model_id, model.n_heads, model.n_ctx)
    sizings = [rank_sizing(plan, r, d.budget, g.master_bytes if r == 0 else 0) for r, d in enumerate(devices)]
    n, largest = len(devices), max(s.weights for s in sizings) / 2**20
    short = [
        f"{d.name} ({'master' if r == 0 else f'rank {r}'}) needs a budget of {s.needed / 2**20:.1f} MiB for one "
        f"layer, it gives {d.budget / 2**20:.1f} MiB"
        for r, (d, s) in enumerate(zip(devices, sizings, strict=True))
        if s.window < 1
    ]
    names = tuple(d.name for d in devices)
    if short:
        return GroupForecast(n, 0, g.n_layers, largest, math.inf, "; ".join(short), names, tuple(sizings))
    ranks = [s.cost(d.memory_bw, d.disk_bw) for d, s in zip(devices, sizings, strict=True)]
    link = LinkCost(max(d.rtt_s for d in devices), link_bandwidth, link_overhead) if n > 1 else None
    s_per_token = predict_s_per_token(ranks, g.n_layers, g.hidden, link, g.vocab)
    window = min(s.window for s in sizings)
    return GroupForecast(n, window, g.n_layers, largest, s_per_token, "", names, tuple(sizings))


def pick(forecasts: Sequence[GroupForecast], tolerance: float = 0.05) -> GroupForecast | None:
    """The fewest devices predicted within ``tolerance`` of the fastest feasible group (``None``:
    none is feasible): a device more must earn its two all-reduces per layer."""
    feasible = [f for f in forecasts if f.feasible]
    if not feasible:
        return None
    best = min(f.s_per_token for f in feasible)
    return min((f for f in feasible if f.s_per_token <= best * (1 + tolerance)), key=lambda f: f.nodes)


def measure_memory_bandwidth(nbytes: int = 64 << 20, threads: int | None = None, runs: int = 4) -> float:
    """Bytes/s of prepacked 4-bit weights the engine's own kernel streams in a decode step: a chain
    of ``MatMulNBits`` mat-vecs (4096 x 4096, block 32, accuracy level 4, as
    :meth:`~potluck.sharding.compute.onnx_ops.GraphBuilder.linear` builds them) over about
    ``nbytes`` of random weights (more than a CPU's caches), counted as MLAS's prepacked bytes
    (the GGUF's x :data:`~potluck.sharding.format.cost.PREPACK_GROWTH`): what a rank's resident
    weights cost per token in the cost model. ``threads``: ORT intra-op threads (default: all cores).
    """
    k = 4096
    prepacked = k * k // 32 * 18 * PREPACK_GROWTH  # bytes of one matrix once MLAS has packed it
    count = max(1, int(nbytes // prepacked))
    rng = np.random.default_rng(0)
    gb = GraphBuilder()
    h = gb.add_input("x", np.float32, [1, k])
    layout = {"kind": "q4", "n": k, "k": k, "block": 32}
    for i in range(count):
        weights = {f"w{i}.B": rng.integers(0, 256, (k, k // 32, 16), dtype=np.uint8)}
        weights[f"w{i}.scales"] = np.full(k * k // 32, 1e-3, np.float32)
        h = gb.linear(h, f"w{i}", layout, weights)
    program = gb.program([(h, np.float32)], session_options(threads or os.cpu_count() or 1, False))
    x, out = np.ones((1, k), np.float32), np.empty((1, k), np.float32)
    program.run({"x": x}, {h: out})  # warm: pages faulted in, thread pool up
    t0 = time.perf_counter()
    for _ in range(runs):
        program.run({"x": x}, {h: out})
    return count * prepacked * runs / (time.perf_counter() - t0)


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


def probe_disk_bandwidth(directory: Path, nbytes: int = 32 << 20) -> float:
    """Bytes/s of a cold sequential read on ``directory``'s disk: writes ``nbytes`` of random data
    to a temporary file there, syncs it, drops it from the page cache, reads it back, deletes it.
    (What a windowed rank's spill files are read at; cheap enough for a node to run at start.)

    Raises:
        OSError: the directory is not writable.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".bw-probe-") as fh:
        fh.write(os.urandom(nbytes))
        fh.flush()
        os.fsync(fh.fileno())
        return measure_disk_bandwidth(Path(fh.name), nbytes)


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
    """Predictions for 1..``max_nodes`` devices like this one (each with ``budget`` bytes and these
    bandwidths, on ``link``): those the planner can split the model over and whose every rank holds
    a window of at least one layer.

    Raises:
        ShardPlanError: no group size is feasible (e.g. fewer KV heads than ranks, or a budget
            too small for one layer plus the head on every group size).
    """
    model = ModelSizes.of(reader, path, n_ctx)
    out, short = [], ""
    for n in range(1, max_nodes + 1):
        devices = [Device(f"device {i}", budget, memory_bw, disk_bw, 1.0, link.rtt_s if i else 0.0) for i in range(n)]
        try:
            row = forecast_group(model, devices, link.bandwidth, link.overhead_s)
        except ShardPlanError:
            continue
        if row.feasible:
            out.append(row)
        else:
            short = row.short
    if not out:
        raise ShardPlanError(f"no group of 1..{max_nodes} devices can hold a window of one layer per rank: {short}")
    return out
