"""Pages of memory-mapped files: find a file's mappings, drop their pages, give freed heap back.

Small wrappers over Linux ``madvise(2)`` (through libc), ``/proc/self/maps`` and glibc's
``malloc_trim``, shared by shard extraction (which walks a GGUF bigger than memory) and the layer
window (:mod:`potluck.sharding.compute.residency`).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux 5.14
PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def madvise(start: int, length: int, advice: int) -> bool:
    """``madvise(start, length, advice)``; ``False`` when the kernel refuses (e.g. an unknown advice)."""
    return _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), advice) == 0


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``): compiling the layer programs
    prepacks every layer on the heap once before writing it out, and glibc keeps what was freed."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def release(ranges: Sequence[tuple[int, int]]) -> None:
    """``MADV_DONTNEED`` on address ranges of clean file mappings: their pages leave this process
    (resident memory shrinks) and are read back from the file on the next touch."""
    for lo, hi in ranges:
        madvise(lo, hi - lo, MADV_DONTNEED)


def file_mappings(paths: Sequence[Path]) -> dict[Path, list[tuple[int, int]]]:
    """``(start, end)`` address ranges of this process's mappings of each file in ``paths``."""
    wanted = {str(Path(p).resolve()): Path(p) for p in paths}
    found: dict[Path, list[tuple[int, int]]] = {p: [] for p in wanted.values()}
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() in wanted:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found[wanted[parts[5].strip()]].append((lo, hi))
    return found


def release_file(path: Path) -> None:
    """:func:`release` every mapping of ``path`` in this process."""
    release(file_mappings([path])[path])


def _read_only_file_view(arr: np.ndarray) -> bool:
    base: object = arr
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return base.mode == "r"
        base = base.base
    return isinstance(base, mmap.mmap)  # np.memmap's own buffer


def release_array(arr: np.ndarray) -> None:
    """Drop the pages under an array that views a read-only memory-mapped file (whole pages,
    rounded outwards: neighbours that share a page are read back on their next touch, as any
    released page is). Anything else (heap memory, whose pages would be lost) is left alone."""
    if arr.nbytes == 0 or not _read_only_file_view(arr):
        return
    lo = arr.ctypes.data & ~(PAGE - 1)
    hi = -(-(arr.ctypes.data + arr.nbytes) // PAGE) * PAGE
    release([(lo, hi)])
