"""Star all-reduce latency: potluck's TCP star against a bare numpy-and-sockets star, in one run.

For N = 2, 4, 8 members (master + N-1 worker processes, multiprocessing "spawn") and float32 payloads
of 16 KiB and 64 KiB, both implementations run in the same processes, interleaved round by round:

- **floor**: raw blocking TCP sockets with TCP_NODELAY, ``sendall`` of the array bytes and
  ``recv_into`` a preallocated buffer, the master sums in rank order and sends the sum back. No
  framing, no sequence numbers, no authentication: what a star all-reduce cannot go below in Python.
- **potluck**: :class:`~potluck.sharding.collective.star.StarMaster` / ``StarWorker`` (framed, sequenced,
  HMAC-authenticated connections, deadlines on every call).

Like with like: the same processes, sockets set up the same way before timing, the same warm-up, and
interleaved blocks whose order alternates (floor first in even blocks, potluck first in odd ones) so
both see the same background load. Prints µs per all-reduce measured on the master (median of
blocks, and the best block), the ratio of the medians potluck / floor (the goal is <= 1.2x), and CPU
µs per all-reduce summed over all members (``time.process_time`` per block, median): on a loaded
machine the CPU figure is the steadier one. Members share this machine's cores, so N > cores
measures CPU time and scheduling as much as the network: read the ratios, not the absolute figures.
The load average is printed before and after the run.

``--transport libp2p`` measures the libp2p-stream fallback as well (``bench/allreduce_libp2p.py``):
floor, TCP star and the star over libp2p streams, side by side in the same processes.

Usage: ``.venv/bin/python bench/allreduce.py [--nodes 2 4 8] [--blocks 40] [--block 25]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from functools import partial
from typing import Any

import numpy as np

from potluck.sharding.collective.auth import new_session_key
from potluck.sharding.collective.star import StarMaster, StarWorker

SIZES = (16 * 1024, 64 * 1024)  # payload bytes (float32)
WARMUP = 30


# -- the floor: a bare star ------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed")
        view = view[n:]


def _tcp(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bare_master_op(socks: list[socket.socket], bufs: list[np.ndarray], own: np.ndarray) -> np.ndarray:
    for sock, buf in zip(socks, bufs, strict=True):
        _recv_exact(sock, memoryview(buf).cast("B"))
    total = own.copy()
    for buf in bufs:
        np.add(total, buf, out=total)
    for sock in socks:
        sock.sendall(total)
    return total


def bare_worker_op(sock: socket.socket, own: np.ndarray) -> np.ndarray:
    sock.sendall(own)
    total = np.empty_like(own)
    _recv_exact(sock, memoryview(total).cast("B"))
    return total


# -- worker process --------------------------------------------------------------------------------


def worker_main(
    rank: int, world: int, bare_addr: Any, star_addr: Any, key: bytes, plan: dict[str, int], cpu_out: Any
) -> None:
    bare = _tcp(socket.create_connection(bare_addr))
    bare.sendall(bytes([rank]))
    star = StarWorker.connect(star_addr, rank, world, key, timeout_s=60)
    cpu: dict[tuple[str, int], list[float]] = {}
    for size in SIZES:
        own = np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32)
        ops = {"floor": partial(bare_worker_op, bare, own), "potluck": partial(star.all_reduce, own)}
        for _ in range(WARMUP):
            ops["floor"]()
            ops["potluck"]()
        for index in range(plan["blocks"]):  # the master's schedule: alternating order
            for name in _order(index):
                began = time.process_time()
                for _ in range(plan["block"]):
                    ops[name]()
                cpu.setdefault((name, size), []).append(time.process_time() - began)
    cpu_out.put(cpu)
    star.close()
    bare.close()


def _order(index: int) -> tuple[str, str]:
    """Which implementation runs first in block ``index``: alternate, so neither always goes first."""
    return ("floor", "potluck") if index % 2 == 0 else ("potluck", "floor")


# -- master ----------------------------------------------------------------------------------------


def run_group(
    world: int, blocks: int, block: int
) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], list[float]]]:
    """µs per op of each block on the master (wall) and summed over all members (CPU), per
    (implementation, payload bytes)."""
    key = new_session_key()
    star = StarMaster(world, key, timeout_s=60)
    listener = socket.create_server(("127.0.0.1", 0), backlog=world)
    ctx = mp.get_context("spawn")
    plan = {"blocks": blocks, "block": block}
    cpu_out = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(r, world, listener.getsockname(), star.address, key, plan, cpu_out))
        for r in range(1, world)
    ]  # the session key reaches the workers through the spawn pipe, never argv
    for proc in procs:
        proc.start()
    try:
        by_rank: dict[int, socket.socket] = {}
        for _ in range(world - 1):
            sock, _ = listener.accept()
            by_rank[sock.recv(1)[0]] = _tcp(sock)
        socks = [by_rank[r] for r in sorted(by_rank)]
        star.accept_workers(timeout_s=120)
        times: dict[tuple[str, int], list[float]] = {}
        cpu: dict[tuple[str, int], list[float]] = {}
        for size in SIZES:
            own = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
            bufs = [np.empty_like(own) for _ in socks]
            ops = {"floor": partial(bare_master_op, socks, bufs, own), "potluck": partial(star.all_reduce, own)}
            for _ in range(WARMUP):
                floor_sum = ops["floor"]()
                star_sum = ops["potluck"]()
            assert star_sum.tobytes() == floor_sum.tobytes(), "the two stars disagree"
            # Interleaved blocks in alternating order: both see the same background load.
            for index in range(blocks):
                for name in _order(index):
                    wall, began = time.perf_counter(), time.process_time()
                    for _ in range(block):
                        ops[name]()
                    cpu.setdefault((name, size), []).append(time.process_time() - began)
                    times.setdefault((name, size), []).append((time.perf_counter() - wall) / block * 1e6)
        for _ in procs:  # add every worker's CPU time to the master's, block by block
            for key_, values in cpu_out.get(timeout=120).items():
                cpu[key_] = [a + b for a, b in zip(cpu[key_], values, strict=True)]
        return times, {k: [v / block * 1e6 for v in values] for k, values in cpu.items()}
    finally:
        star.close()
        listener.close()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--blocks", type=int, default=40, help="interleaved blocks per implementation")
    parser.add_argument("--block", type=int, default=25, help="all-reduces per block")
    parser.add_argument("--transport", choices=["tcp", "libp2p"], default="tcp")
    args = parser.parse_args()
    if args.transport == "libp2p":  # floor, TCP star and libp2p-stream star side by side
        from allreduce_libp2p import main as libp2p_main

        return libp2p_main(args.nodes, args.blocks, args.block)
    print(
        f"star all-reduce, float32, {args.blocks} interleaved blocks x {args.block} ops per implementation; "
        f"{os.cpu_count()} cores, load average {_load()} before"
    )
    print("wall µs/op on the master: median of blocks (min); CPU µs/op summed over all members: median of blocks")
    columns = f"{'N':>3} {'payload':>8} {'floor µs':>16} {'potluck µs':>16} {'ratio':>6}"
    print(f"{columns}   {'CPU floor':>9} {'potluck':>8} {'ratio':>6}")
    began = time.perf_counter()
    worst = 0.0
    for world in args.nodes:
        times, cpu = run_group(world, args.blocks, args.block)
        for size in SIZES:
            floor, ours = times["floor", size], times["potluck", size]
            ratio = statistics.median(ours) / statistics.median(floor)
            cpu_floor, cpu_ours = statistics.median(cpu["floor", size]), statistics.median(cpu["potluck", size])
            worst = max(worst, ratio)
            print(
                f"{world:>3} {size // 1024:>6}Ki {statistics.median(floor):>8.1f} ({min(floor):>5.1f}) "
                f"{statistics.median(ours):>8.1f} ({min(ours):>5.1f}) {ratio:>5.2f}x   "
                f"{cpu_floor:>9.1f} {cpu_ours:>8.1f} {cpu_ours / cpu_floor:>5.2f}x",
                flush=True,
            )
    print(
        f"worst wall ratio {worst:.2f}x (goal <= 1.20x); total {time.perf_counter() - began:.0f} s; "
        f"load average {_load()} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
