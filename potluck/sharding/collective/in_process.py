"""An in-process :class:`~potluck.sharding.collective.base.Collective`: threads and bounded queues.

The star pattern of :mod:`potluck.sharding.collective.star` without sockets, for unit tests of the engine
(httpx's ``MockTransport`` idea): the master puts broadcasts into one bounded queue per worker;
workers put partial sums into one bounded queue per rank on the master side; the master adds them
in rank order 0, 1, 2, ... and puts the sum into each worker's result queue. Every wait has the
group's ``timeout_s`` deadline; the master raises :class:`PeerFailed` for a worker that stalls,
was :meth:`LocalStar.kill`-ed or closed, and a worker raises :class:`TransferError` when the master
does. Arrays are copied on every hop, as a network would.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from potluck.errors import ClosedError, PeerFailed, TransferError

_GONE = object()
QUEUE_DEPTH = 4


class LocalStar:
    """A star group of ``world_size`` members living in one process.

    Args:
        world_size: members, rank 0 is the master.
        timeout_s: deadline of every wait, in seconds (workers' :meth:`receive` waits
            ``idle_timeout_s`` instead, since a worker idles between requests).
        idle_timeout_s: how long a worker waits for the next broadcast.
    """

    def __init__(self, world_size: int, timeout_s: float = 10.0, idle_timeout_s: float = 3600.0) -> None:
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.down: list[queue.Queue[Any]] = [queue.Queue(QUEUE_DEPTH) for _ in range(world_size)]
        self.results: list[queue.Queue[Any]] = [queue.Queue(QUEUE_DEPTH) for _ in range(world_size)]
        self.up: list[queue.Queue[Any]] = [queue.Queue(QUEUE_DEPTH) for _ in range(world_size)]
        self.members = [LocalCollective(self, r) for r in range(world_size)]

    def kill(self, rank: int) -> None:
        """Simulate the death of member ``rank`` (tests): its peers see it as gone."""
        self.members[rank].close()


class LocalCollective:
    """One member's view of a :class:`LocalStar` (implements ``Collective``)."""

    def __init__(self, star: LocalStar, rank: int) -> None:
        self._star = star
        self.rank = rank
        self.world_size = star.world_size
        self._closed = threading.Event()

    # -- helpers -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ClosedError(f"rank {self.rank}: collective is closed")

    def _put(self, q: queue.Queue[Any], item: Any, peer: int) -> None:
        try:
            q.put(item, timeout=self._star.timeout_s)
        except queue.Full:
            self._fail(peer, "did not drain its queue")

    def _get(self, q: queue.Queue[Any], peer: int, timeout: float) -> Any:
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            self._fail(peer, f"stalled for {timeout:.1f} s")
        if item is _GONE:
            self._fail(peer, "went away")
        return item

    def _fail(self, peer: int, why: str) -> None:
        if self.rank == 0:
            raise PeerFailed(f"rank {peer} {why}", rank=peer)
        raise TransferError(f"master {why}")

    def _require(self, master: bool) -> None:
        self._check_open()
        if (self.rank == 0) != master:
            raise RuntimeError(f"rank {self.rank} cannot call a {'master' if master else 'worker'} method")

    # -- Collective ----------------------------------------------------------------------
    def broadcast(self, header: dict[str, Any], array: np.ndarray | None = None) -> None:
        self._require(master=True)
        for r in range(1, self.world_size):
            if self._star.members[r]._closed.is_set():
                raise PeerFailed(f"rank {r} went away", rank=r)
            self._put(self._star.down[r], (dict(header), None if array is None else array.copy()), r)

    def receive(self) -> tuple[dict[str, Any], np.ndarray | None]:
        self._require(master=False)
        return self._get(self._star.down[self.rank], 0, self._star.idle_timeout_s)

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        self._check_open()
        star = self._star
        if self.rank != 0:
            self._put(star.up[self.rank], np.array(array, dtype=np.float32), 0)
            return self._get(star.results[self.rank], 0, star.timeout_s)
        total = np.array(array, dtype=np.float32)
        for r in range(1, self.world_size):
            if star.members[r]._closed.is_set() and star.up[r].empty():
                raise PeerFailed(f"rank {r} went away", rank=r)
            part = self._get(star.up[r], r, star.timeout_s)
            if part.shape != total.shape:
                raise PeerFailed(f"rank {r} sent shape {part.shape}, expected {total.shape}", rank=r)
            total += part
        for r in range(1, self.world_size):
            self._put(star.results[r], total.copy(), r)
        return total

    def gather(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]] = ()) -> list[np.ndarray]:
        self._check_open()
        star = self._star
        if self.rank != 0:
            if shapes:
                raise ValueError("gather shapes are the master's to check; a worker passes none")
            self._put(star.up[self.rank], np.array(array, dtype=np.float32), 0)
            return []
        if len(shapes) != self.world_size:
            raise ValueError(f"gather needs {self.world_size} shapes, got {len(shapes)}")
        out = [np.array(array, dtype=np.float32)]
        for r in range(1, self.world_size):
            if star.members[r]._closed.is_set() and star.up[r].empty():
                raise PeerFailed(f"rank {r} went away", rank=r)
            part = self._get(star.up[r], r, star.timeout_s)
            if part.shape != tuple(shapes[r]):
                raise PeerFailed(f"rank {r} sent shape {part.shape}, expected {tuple(shapes[r])}", rank=r)
            out.append(part)
        return out

    def close(self) -> None:
        """Close this member; peers waiting on it are woken with a failure."""
        if self._closed.is_set():
            return
        self._closed.set()
        star = self._star
        targets = (
            [star.down[r] for r in range(1, self.world_size)] + star.results[1:]
            if self.rank == 0
            else [star.up[self.rank]]
        )
        for q in targets:
            try:
                q.put_nowait(_GONE)
            except queue.Full:
                pass  # the peer will time out instead
