"""Resident memory of one rank while it decodes, in a process of its own (run by test_residency).

    python -m tests.sharding.compute.rss_probe SHARD SPILL_DIR BUDGET_BYTES TOKENS

Prints one JSON line: ``base`` (VmRSS after the imports, the shard mapped but not read), ``peak``
(the highest VmRSS sampled after each decode step), ``window`` (layers resident at once, 0 when the
rank is fully resident) and the greedy ``tokens``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.format.shard_file import read_shard


def vm_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str]) -> None:
    shard_path, spill, budget, tokens = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3])
    shard = read_shard(shard_path)
    base = vm_rss()
    options = EngineOptions(n_ctx=64, threads=1, memory_budget=budget, spill_dir=spill)
    master = TPMaster(RankCompute.from_shard(shard, options), shard, None)
    try:
        token, pos, out, peak = 1, 0, [], 0
        for _ in range(tokens):
            token = int(np.argmax(master.forward([token], pos)[-1]))
            out.append(token)
            pos += 1
            peak = max(peak, vm_rss())
        window = master.compute.window.window if master.compute.window else 0
    finally:
        master.shutdown()
    detail = {k: v for k, v in (line.split(":", 1) for line in open("/proc/self/status")) if k.startswith("Rss")}
    print(json.dumps({"base": base, "peak": peak, "window": window, "tokens": out, "detail": detail}))


if __name__ == "__main__":
    main(sys.argv[1:])
