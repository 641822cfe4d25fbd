"""A star worker as a separate process, driven by the master's broadcasts (for tests and the bench).

Usage: ``python -m tests.sharding.collective.star_proc HOST PORT RANK WORLD_SIZE WIRE_DTYPE TIMEOUT_S`` with the
session key as hex on stdin (never on the command line).

Broadcast ops (control header ``op``):
- ``reduce``: ``{"seed": int, "n": int, "repeat": int, "stall_rank": int, "stall_s": float}``; the
  partial sum of rank r is ``partial(seed, r, n)``; the rank ``stall_rank`` sleeps ``stall_s`` before
  contributing. Each result is checked against the rank-ordered expected sum; a mismatch exits 3.
- ``stop``: exit 0.

Exit codes: 0 done or master closed the group, 3 wrong sum, 4 transfer error mid-operation.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from potluck.errors import TransferError
from potluck.sharding.collective.star import StarWorker


def partial(seed: int, rank: int, n: int) -> np.ndarray:
    """The test partial sum of ``rank``: float32, shape (n,)."""
    return np.random.default_rng([seed, rank]).standard_normal(n).astype(np.float32)


def expected_sum(seed: int, world_size: int, n: int, wire: np.dtype) -> np.ndarray:
    """What every rank must get: rank-ordered float32 sum of the (wire-rounded) partials."""
    total = partial(seed, 0, n).copy()
    for rank in range(1, world_size):
        np.add(total, partial(seed, rank, n).astype(wire), out=total)
    return total.astype(wire).astype(np.float32)


def main(argv: list[str]) -> int:
    host, port, rank, world, wire_name, timeout_s = argv
    key = bytes.fromhex(sys.stdin.readline().strip())
    wire = np.dtype(wire_name)
    worker = StarWorker.connect((host, int(port)), int(rank), int(world), key, float(timeout_s), wire)
    try:
        while True:
            try:
                header, _ = worker.receive(timeout_s=math.inf)
            except TransferError:
                return 0  # the master closed the group
            if header["op"] == "stop":
                return 0
            seed, n = header["seed"], header["n"]
            want = expected_sum(seed, worker.world_size, n, wire)
            for _ in range(header.get("repeat", 1)):
                if header.get("stall_rank") == worker.rank:
                    time.sleep(header["stall_s"])
                try:
                    got = worker.all_reduce(partial(seed, worker.rank, n))
                except TransferError:
                    return 4
                if got.tobytes() != want.tobytes():
                    return 3
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
