"""Star all-reduce over libp2p streams (the fallback path), beside the TCP star and the bare floor.

Run through ``bench/allreduce.py --transport libp2p``. For each N, the master and N-1 worker
processes ("spawn") each start a bare libp2p host (TCP + Noise + Yamux, :class:`StandaloneHost`);
every worker dials the master and opens one stream, wrapped in
:class:`~potluck.overlay.tp_stream.Libp2pByteStream` and admitted with ``StarMaster.admit`` /
``StarWorker.over``, exactly what a swarm node does when no direct TCP path exists. Three
implementations run in the same processes, in interleaved blocks (order rotating per block) so
all see the same background load:

- **floor**: the bare numpy-and-sockets star of ``allreduce.py``;
- **tcp**: potluck's TCP star;
- **libp2p**: potluck's star over libp2p streams (every send/receive crosses into the overlay's
  trio thread, then Noise encryption and Yamux framing).

Prints wall µs per all-reduce on the master (median of blocks, min) and each ratio to the floor.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from potluck.overlay.endpoint import StandaloneHost
from potluck.overlay.tp_stream import Libp2pByteStream
from potluck.sharding.collective.auth import new_session_key
from potluck.sharding.collective.channel import FrameChannel
from potluck.sharding.collective.star import StarMaster, StarWorker

PROTOCOL = "/potluck/bench-star/1"
NAMES = ("floor", "tcp", "libp2p")


def _order(index: int) -> tuple[str, ...]:
    k = index % len(NAMES)
    return NAMES[k:] + NAMES[:k]


def worker_main(rank: int, world: int, addrs: dict[str, Any], keys: tuple[bytes, bytes], plan: dict[str, int]) -> None:
    import allreduce as ar  # bench/ is on sys.path in the spawned child (same __main__ directory)

    bare = ar._tcp(socket.create_connection(addrs["bare"]))
    bare.sendall(bytes([rank]))
    tcp = StarWorker.connect(addrs["star"], rank, world, keys[0], timeout_s=60)
    with tempfile.TemporaryDirectory() as home, StandaloneHost(Path(home)) as endpoint:
        master = endpoint.run(endpoint.host.connect, addrs["p2p"])
        stream = endpoint.run(endpoint.host.open_stream, master, PROTOCOL)
        channel = FrameChannel(Libp2pByteStream(endpoint.bridge, stream, master))
        p2p = StarWorker.over(channel, rank, world, keys[1], timeout_s=60)
        for size in ar.SIZES:
            own = np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32)
            ops = {
                "floor": lambda own=own: ar.bare_worker_op(bare, own),
                "tcp": lambda own=own: tcp.all_reduce(own),
                "libp2p": lambda own=own: p2p.all_reduce(own),
            }
            for _ in range(ar.WARMUP):
                for name in NAMES:
                    ops[name]()
            for index in range(plan["blocks"]):
                for name in _order(index):
                    for _ in range(plan["block"]):
                        ops[name]()
        p2p.close()
    tcp.close()
    bare.close()


def run_group(world: int, blocks: int, block: int) -> dict[tuple[str, int], list[float]]:
    """µs per op of each block on the master, per (implementation, payload bytes)."""
    import allreduce as ar

    keys = (new_session_key(), new_session_key())
    tcp = StarMaster(world, keys[0], timeout_s=60)
    p2p = StarMaster(world, keys[1], timeout_s=60)
    listener = socket.create_server(("127.0.0.1", 0), backlog=world)
    arrived: queue.Queue[Libp2pByteStream] = queue.Queue()
    home = tempfile.TemporaryDirectory()
    endpoint = StandaloneHost(Path(home.name)).start()
    assert endpoint.bridge is not None
    bridge = endpoint.bridge

    async def handler(stream: Any, peer: str) -> None:
        done = anyio.Event()

        async def closed() -> None:
            done.set()

        arrived.put(Libp2pByteStream(bridge, stream, peer, on_close=closed))
        await done.wait()

    endpoint.set_handler(PROTOCOL, handler)
    addrs = {"bare": listener.getsockname(), "star": tcp.address, "p2p": endpoint.addr}
    ctx = mp.get_context("spawn")
    plan = {"blocks": blocks, "block": block}
    procs = [ctx.Process(target=worker_main, args=(r, world, addrs, keys, plan)) for r in range(1, world)]
    for proc in procs:
        proc.start()
    try:
        by_rank: dict[int, socket.socket] = {}
        for _ in range(world - 1):
            sock, _ = listener.accept()
            by_rank[sock.recv(1)[0]] = ar._tcp(sock)
        socks = [by_rank[r] for r in sorted(by_rank)]
        tcp.accept_workers(timeout_s=120)
        admitted = 0
        while admitted < world - 1:
            if p2p.admit(FrameChannel(arrived.get(timeout=120)), timeout_s=60) is not None:
                admitted += 1
        times: dict[tuple[str, int], list[float]] = {}
        for size in ar.SIZES:
            own = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
            bufs = [np.empty_like(own) for _ in socks]
            ops = {
                "floor": lambda own=own, bufs=bufs: ar.bare_master_op(socks, bufs, own),
                "tcp": lambda own=own: tcp.all_reduce(own),
                "libp2p": lambda own=own: p2p.all_reduce(own),
            }
            for _ in range(ar.WARMUP):
                sums = [ops[name]().tobytes() for name in NAMES]
            assert sums[0] == sums[1] == sums[2], "the three stars disagree"
            for index in range(blocks):
                for name in _order(index):
                    began = time.perf_counter()
                    for _ in range(block):
                        ops[name]()
                    times.setdefault((name, size), []).append((time.perf_counter() - began) / block * 1e6)
        return times
    finally:
        p2p.close()
        tcp.close()
        listener.close()
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
        endpoint.stop()
        home.cleanup()


def main(nodes: list[int], blocks: int, block: int) -> int:
    import allreduce as ar

    print(
        f"star all-reduce, float32, {blocks} interleaved blocks x {block} ops per implementation; "
        "wall µs/op on the master: median of blocks (min); ratios to the bare floor"
    )
    print(f"{'N':>3} {'payload':>8} {'floor µs':>16} {'tcp µs':>16} {'ratio':>6} {'libp2p µs':>17} {'ratio':>7}")
    began = time.perf_counter()
    for world in nodes:
        times = run_group(world, blocks, block)
        for size in ar.SIZES:
            floor = statistics.median(times["floor", size])
            row = f"{world:>3} {size // 1024:>6}Ki {floor:>8.1f} ({min(times['floor', size]):>5.1f})"
            for name in ("tcp", "libp2p"):
                med = statistics.median(times[name, size])
                width = 8 if name == "tcp" else 9
                row += f" {med:>{width}.1f} ({min(times[name, size]):>5.1f}) {med / floor:>5.2f}x"
            print(row, flush=True)
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0
