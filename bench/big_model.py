"""A 70B-geometry model on this machine under a memory budget: resident memory, s/token, the floor.

    .venv/bin/python bench/big_model.py [--layers 8] [--typing q4_0] [--nodes 4,8] [--budget 1GiB]
                                        [--tokens 3] [--dir DIR]

Writes (once, cached in ``DIR``) a random-weight GGUF with Llama-3-70B's geometry (hidden 8192, 64
heads, 8 KV heads, FFN 28672, vocabulary 128256) and ``--layers`` of its 80 layers
(:mod:`potluck.sharding.format.synthetic`, streamed to disk). For each N it starts a master and
N-1 worker processes on this machine (:class:`~potluck.sharding.orchestration.launch.ProcessGroup`),
every rank under ``--budget`` with ``drop_cache``: a rank whose slices exceed the budget keeps a
window of layers and reads the others back from disk every token (the page cache is dropped for
them, as it would be for a model larger than the machine's memory).

Anchor: the streaming floor, the slowest rank's (weight bytes read from disk per token / the disk's
measured sequential read bandwidth + resident weight bytes / measured memory bandwidth). Printed
per rank: window, peak RSS while loading and while decoding (``VmHWM``, reset in between), compute,
all-reduce and I/O-stall ms per token; then s/token against the floor. Last, the cost model
(:mod:`potluck.sharding.format.cost`) projects all 80 layers on 4 and 8 devices with the measured
bandwidths and 0.3 ms (wired, 1 Gbit/s) or 3 ms (Wi-Fi, 100 Mbit/s) links, beside published anchors.
All N ranks share this machine's 2 cores and one disk, so measured s/token is for N ranks on one
machine, not N devices.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from potluck.sharding.format.cost import RankCost, predict_s_per_token, rank_sizing  # noqa: E402
from potluck.sharding.format.gguf_tensors import open_gguf  # noqa: E402
from potluck.sharding.format.synthetic import GEOMETRIES, write_random_gguf  # noqa: E402
from potluck.sharding.orchestration.forecast import LINKS as LINK_COSTS  # noqa: E402
from potluck.sharding.orchestration.forecast import ModelSizes, measure_disk_bandwidth  # noqa: E402

MiB = 1 << 20
N_CTX = 128
ANCHORS = [
    ("TPI-LLM, Llama 2 70B, 8 laptops on Wi-Fi, 3.1 GB each", 26.0),
    ("distributed-llama, Llama 2 70B, 8 x Raspberry Pi 4B", 4.8),
    ("prima.cpp, 70B, 4 home devices (2 with GPUs)", 0.674),
]
LINKS = {"wired 0.3 ms, 1 Gbit/s": LINK_COSTS["wired"], "Wi-Fi 3 ms, 100 Mbit/s": LINK_COSTS["wifi"]}


def vm_hwm(pid: int) -> int:
    """Peak resident set of process ``pid``, bytes (``VmHWM``)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int) -> None:
    """Reset ``VmHWM`` of ``pid`` to its current RSS (``clear_refs`` 5, Linux 4.0+)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


def run_group(model: Path, n: int, budget: int, tokens: int, shard_dir: Path) -> dict:
    from potluck.sharding.compute.engine import EngineOptions
    from potluck.sharding.format.plan import NodeCapability
    from potluck.sharding.orchestration.launch import ProcessGroup

    nodes = [NodeCapability(f"local-{r}", 1 << 40, 1.0) for r in range(n)]
    options = EngineOptions(n_ctx=N_CTX, memory_budget=budget, drop_cache=True)
    me = os.getpid()
    reset_hwm(me)
    t0 = time.perf_counter()
    with ProcessGroup(model, nodes, options, shard_dir, timeout_s=600.0) as group:
        load_s = time.perf_counter() - t0
        pids = [me, *(group.pid(r) for r in range(1, n))]
        load_peak = [vm_hwm(p) for p in pids]
        for p in pids:
            reset_hwm(p)
        master = group.master
        token = int(np.argmax(master.forward([1, 2, 3, 4], 0)[-1]))
        master.reset_stats()
        t1 = time.perf_counter()
        for pos in range(4, 4 + tokens):
            token = int(np.argmax(master.forward([token], pos)[-1]))
        s_per_token = (time.perf_counter() - t1) / tokens
        stats = master.gather_stats()
        decode_peak = [vm_hwm(p) for p in pids]
        plan = group.plan
    return {
        "plan": plan,
        "load_s": load_s,
        "s_per_token": s_per_token,
        "stats": stats,
        "load_peak": load_peak,
        "decode_peak": decode_peak,
    }


def main() -> None:
    from potluck.cli.shard import _size
    from potluck.config import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="layers of the 80 to write and run")
    ap.add_argument("--typing", default="q4_0", choices=("q4_0", "q4_k_m"))
    ap.add_argument("--nodes", default="4,8")
    ap.add_argument("--budget", default="1GiB", help="memory budget of every rank")
    ap.add_argument("--tokens", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=default_cache_dir() / "bench")
    args = ap.parse_args()
    geometry = GEOMETRIES["llama3-70b"]
    g = type(geometry)(**{**geometry.__dict__, "layers": args.layers})
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / f"llama3-70b-geometry-{args.layers}L-{args.typing}.gguf"
    if not model.is_file():
        t0 = time.perf_counter()
        size = write_random_gguf(model, g, args.typing)
        print(f"wrote {model.name}: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    budget = _size(args.budget)
    sizes = ModelSizes.of(open_gguf(model), model, N_CTX)
    disk_bw = measure_disk_bandwidth(model, 2 << 30)
    cache_bw = measure_disk_bandwidth(model, 2 << 30, cold=False)
    print(f"{model.name}: {model.stat().st_size / 1e9:.2f} GB; disk read {disk_bw / 1e9:.2f} GB/s (cold), "
          f"{cache_bw / 1e9:.2f} GB/s (page cache); budget {budget / MiB:.0f} MiB per rank")  # fmt: skip
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {}
    whole_layer: dict[int, float] = {}  # per N: one whole layer's bytes, the sum of the ranks' slices
    for n in (int(x) for x in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix="potluck-big-", dir=args.dir) as shard_dir:
            results[n] = r = run_group(model, n, budget, args.tokens, Path(shard_dir))
        print(f"\nN = {n}: loaded in {r['load_s']:.0f} s; decode {r['s_per_token']:.2f} s/token")
        print("rank  window    peak RSS load | decode   compute | all-reduce | I/O stall  ms/token")
        costs = []
        for rank, st in enumerate(r["stats"]):
            steps = max(st.steps, 1)
            window = st.window or g.layers
            # measured per-layer bytes of a windowed rank; the planner's estimate for a resident one
            extra = sizes.geometry.master_bytes if rank == 0 else 0
            layer = st.layer_mib * MiB or rank_sizing(r["plan"], rank, budget, extra).per_layer
            costs.append(RankCost(window * layer, (g.layers - window) * layer, cache_bw, disk_bw))
            whole_layer[n] = whole_layer.get(n, 0.0) + layer
            peaks = f"{r['load_peak'][rank] / MiB:7.0f} | {r['decode_peak'][rank] / MiB:6.0f} MiB"
            ms = [x / steps * 1e3 for x in (st.compute_s, st.comm_s, st.io_s)]
            print(f"{rank:>4}  {window:>3}/{g.layers:<3}   {peaks}  {ms[0]:8.0f} | {ms[1]:10.0f} | {ms[2]:9.0f}")
        floor = max(c.weight_s for c in costs)
        # here the N ranks share one disk and one memory bus: their reads add up
        shared = sum(c.streamed_bytes for c in costs) / disk_bw + sum(c.resident_bytes for c in costs) / cache_bw
        print(
            f"streaming floor {floor:.2f} s/token with a disk per rank (slowest rank), {shared:.2f} s/token for "
            f"{n} ranks sharing this machine's disk; measured / floor = {r['s_per_token'] / floor:.2f}x, "
            f"measured / shared-disk floor = {r['s_per_token'] / shared:.2f}x"
        )
    # Projection: 80 layers; each device holds 1/N of every layer; per-layer bytes from the run's N.
    print("\nprojected Llama-3-70B geometry, 80 layers, one rank per device (cost model, measured bandwidths):")
    for n in results:
        layer_bytes = whole_layer[n] / n  # each device holds 1/N of every layer
        window = max(1, int((2 << 30) * 0.6 // layer_bytes))  # a 2 GiB device, 60 % of it for the window
        per_rank = RankCost(min(window, 80) * layer_bytes, max(0, 80 - window) * layer_bytes, cache_bw, disk_bw)
        for name, link in LINKS.items():
            s = predict_s_per_token([per_rank] * n, 80, g.hidden, link, g.vocab)
            print(f"  N = {n}, {name}: {s:.2f} s/token (window {window} of 80 layers per device)")
    for name, s in ANCHORS:
        print(f"  anchor: {name}: {s} s/token")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
