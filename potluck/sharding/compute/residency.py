"""Sliding-window residency of a rank's layers (TPI-LLM, Li et al. 2024, §3.2: prefetch while computing).

A rank whose layer slices do not fit its memory budget keeps only a *window* of ``w`` consecutive
layers resident. Each layer's ONNX Runtime programs are written once to disk with their prepacked
weights (ORT's ``session.save_external_prepacked_constant_initializers``) and loaded back, so ORT
memory-maps the weights from a file per layer instead of holding them on the heap. This module
then drives those mappings with ``madvise(2)``:

- :meth:`LayerWindow.enter` (before layer ``i`` runs) waits until layer ``i`` is resident and asks
  the prefetch thread for the layers after it, up to the window (cyclically: decoding runs layers
  ``0..L-1`` once per token). The thread populates their pages (``MADV_POPULATE_READ``, Linux
  5.14+; ``MADV_WILLNEED`` and a read of each page before that) while this layer computes and
  all-reduces.
- :meth:`LayerWindow.leave` (after layer ``i``) releases layer ``i`` when it is not in the next
  window: ``MADV_DONTNEED`` drops its pages from the process (they are clean, file-backed: the next
  touch reads them back), and ``posix_fadvise(DONTNEED)`` drops them from the page cache when
  ``drop_cache`` is set, so the next read comes from disk as it would for a model larger than RAM.

The mappings are found in ``/proc/self/maps`` by file name (one data file per layer program).
Counters (:class:`WindowStats`): seconds stalled waiting for a layer, seconds the prefetch thread
spent populating, layers released and fetched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from potluck.errors import ShardPlanError
from potluck.sharding.format.pages import MADV_POPULATE_READ, MADV_WILLNEED, PAGE, file_mappings, madvise, release

log = logging.getLogger(__name__)


@dataclass
class WindowStats:
    """Seconds and counts of the window's work since the last reset.

    Attributes:
        stall_s: time :meth:`LayerWindow.enter` waited for a layer not yet populated.
        prefetch_s: time the prefetch thread spent populating layers (overlapped with compute).
        fetched: layers populated; released: layers released.
    """

    stall_s: float = 0.0
    prefetch_s: float = 0.0
    fetched: int = 0
    released: int = 0


@dataclass
class LayerWindow:
    """Keeps ``window`` of ``len(files)`` layers resident (see the module docstring).

    Args:
        files: per layer, the data files its programs map (after the programs are loaded).
        window: layers resident at once (>= 1).
        drop_cache: also drop released layers from the page cache.

    :meth:`start` releases every layer outside the first window and starts the prefetch thread;
    :meth:`close` stops and joins it (also as a context manager). Build with :meth:`within` to size
    the window from a budget.

    Raises:
        ShardPlanError: a layer's files are not mapped (the programs were not loaded from them).
    """

    files: list[list[Path]]
    window: int
    drop_cache: bool = False
    stats: WindowStats = field(default_factory=WindowStats)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ShardPlanError("a layer window needs at least one layer")
        maps = file_mappings([f for fs in self.files for f in fs])
        self.ranges = [[r for f in fs for r in maps[f]] for fs in self.files]
        for i, ranges in enumerate(self.ranges):
            if self.files[i] and not ranges:
                raise ShardPlanError(f"layer {i}'s weights are not memory-mapped from {self.files[i][0]}")
        self.layer_bytes = [sum(hi - lo for lo, hi in r) for r in self.ranges]
        self._resident: set[int] = set(range(len(self.files)))
        self._ready = {i: threading.Event() for i in range(len(self.files))}
        for e in self._ready.values():
            e.set()
        self._requests: queue.Queue[int | None] = queue.Queue(maxsize=len(self.files) + 1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def within(cls, files: list[list[Path]], budget: int, fixed: int, drop_cache: bool = False) -> LayerWindow:
        """The widest window whose layers fit ``budget - fixed`` bytes, started.

        Args:
            files: per layer, its programs' data files (already mapped).
            budget: the rank's memory budget, bytes.
            fixed: what the rank holds besides layer weights (KV cache, head), bytes.

        Raises:
            ShardPlanError: not even one layer fits; the message names the budget that would.
        """
        probe = cls(files, 1, drop_cache)
        widest = max(probe.layer_bytes)
        room = budget - fixed
        if room < widest:
            need = (fixed + widest + (1 << 20) - 1) >> 20
            raise ShardPlanError(
                f"a memory budget of {budget / 2**20:.0f} MiB is too small: the KV cache and head take "
                f"{fixed / 2**20:.0f} MiB and one layer's slice {widest / 2**20:.1f} MiB; at least {need} MiB "
                "holds a window of one layer (or add ranks, so that each holds less)"
            )
        probe.window = min(len(files), room // widest)
        return probe.start()

    @property
    def n_layers(self) -> int:
        return len(self.files)

    def _next(self, i: int) -> list[int]:
        """The window that starts at layer ``i``."""
        return [(i + k) % self.n_layers for k in range(min(self.window, self.n_layers))]

    def start(self) -> LayerWindow:
        """Release the layers outside the first window and start the prefetch thread."""
        keep = set(self._next(0))
        for i in range(self.n_layers):
            if i not in keep:
                self._release(i)
        self._thread = threading.Thread(target=self._prefetch_loop, name="potluck-layer-prefetch", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop and join the prefetch thread (idempotent)."""
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> LayerWindow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enter(self, i: int) -> None:
        """Before layer ``i`` runs: wait for it, then prefetch the rest of the window after it."""
        ready = self._ready[i]
        if not ready.is_set():
            t0 = time.perf_counter()
            ready.wait()
            self.stats.stall_s += time.perf_counter() - t0
        elif i not in self._resident:  # not prefetched (a window of one layer): fetch it now
            t0 = time.perf_counter()
            self._fetch(i)
            self.stats.stall_s += time.perf_counter() - t0
        for j in self._next(i)[1:]:
            self._request(j)

    def leave(self, i: int) -> None:
        """After layer ``i``: release it unless the window starting at the next layer keeps it."""
        if i not in self._next((i + 1) % self.n_layers):
            self._release(i)

    def _request(self, j: int) -> None:
        with self._lock:
            if j in self._resident or not self._ready[j].is_set():
                return
            self._ready[j].clear()
        self._requests.put(j)

    def _release(self, i: int) -> None:
        with self._lock:
            if i not in self._resident:
                return
            self._resident.discard(i)
        release(self.ranges[i])
        if self.drop_cache:
            for f in self.files[i]:
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        self.stats.released += 1

    def _fetch(self, j: int) -> None:
        t0 = time.perf_counter()
        for lo, hi in self.ranges[j]:  # start the disk reads of every range at once (readahead) ...
            madvise(lo, hi - lo, MADV_WILLNEED)
        for lo, hi in self.ranges[j]:  # ... then map the pages in, waiting for them where needed
            if not madvise(lo, hi - lo, MADV_POPULATE_READ):
                buf = (ctypes.c_char * (hi - lo)).from_address(lo)
                for off in range(0, hi - lo, PAGE):  # touch every page
                    buf[off]
        with self._lock:
            self._resident.add(j)
        self.stats.prefetch_s += time.perf_counter() - t0
        self.stats.fetched += 1

    def _prefetch_loop(self) -> None:
        while (j := self._requests.get()) is not None:
            try:
                self._fetch(j)
            finally:
                self._ready[j].set()
