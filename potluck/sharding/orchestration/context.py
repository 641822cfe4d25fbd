"""What a swarm group needs of the node: the swarm port, the loop, deadlines, places on disk."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from potluck.errors import ClosedError, ConnectError
from potluck.sharding.collective import transfer
from potluck.sharding.orchestration.pending import PendingJoin
from potluck.sharding.orchestration.ports import SwarmPort

T = TypeVar("T")


@dataclass
class SwarmContext:
    """What a :class:`~potluck.sharding.orchestration.swarm.SwarmGroup` needs of the node.

    Attributes:
        overlay: the swarm, as sharding sees it (the overlay's ``OverlaySwarmPort``).
        loop: the node's asyncio loop (swarm calls run there).
        registry: session id -> :class:`PendingJoin` (where tp-star streams are delivered).
        bind_host: where the star listens for workers' direct TCP connections.
        shard_dir: where the master writes worker shard files.
        transport: ``auto`` / ``tcp`` / ``libp2p`` (told to workers).
        timeout_s: all-reduce deadline, seconds.
        join_timeout_s: deadline to find workers and have them joined and loaded, seconds.
        threads: ONNX Runtime threads of the master's rank.
        accuracy_level: ``MatMulNBits`` accuracy level of every rank.
        memory_budget: resident bytes of the master's rank (0: no limit; over it, a layer window).
        spill_dir: where a windowed master rank writes its per-layer files.
        manifests: shard file -> its manifest (hashed once per file).
        stop: set when the node shuts down (ends a load still waiting for workers).
    """

    overlay: SwarmPort
    loop: asyncio.AbstractEventLoop
    registry: dict[str, PendingJoin]
    bind_host: str
    shard_dir: Path
    transport: str = "auto"
    timeout_s: float = 10.0
    join_timeout_s: float = 120.0
    threads: int = 1
    accuracy_level: int = 4
    memory_budget: int = 0
    spill_dir: Path | None = None
    manifests: dict[Path, transfer.Manifest] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def check_stop(self) -> None:
        """Raises:
        ClosedError: the node is shutting down.
        """
        if self.stop.is_set():
            raise ClosedError("the node is shutting down")

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the node's loop from this (non-loop) thread and wait for its result.

        Raises:
            ConnectError: it took longer than ``timeout`` seconds (it is cancelled).
            whatever ``coro`` raised.
        """
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError as exc:
            fut.cancel()
            raise ConnectError(f"overlay call timed out after {timeout} s") from exc
