"""How many compute threads llama.cpp should use on a device that is also someone's laptop.

llama.cpp splits every matmul evenly over its threads and waits for the slowest: when another
process holds one core, a thread placed there is descheduled and every step waits for it. Measured
on a 2-core machine (``bench/threads.py``), SmolLM2-135M decodes faster with 1 thread than with 2
once one core is busy. The node's own Python threads (HTTP, token hand-off) are such a process
too: on the same idle 2-core machine the batched engine decoded SmolLM2 at 83 tok/s with 2 threads
and 127-135 with 1. So the rule is: use the cores other processes leave free, minus one kept for
the node's own threads (at least one, at most ``max_threads``), re-read about once a second by the
decode loop (:class:`~potluck.inference.batched.BatchEngine`), which can change the count between
steps.
"""

from __future__ import annotations

import math
import os

import psutil

# Another process's load (in cores) from which a core counts as taken.
BUSY_CORE_THRESHOLD = 0.6


def choose_threads(cores: int, system_busy: float, own_busy: float, max_threads: int, reserve: int = 0) -> int:
    """Threads to use: the cores not kept busy by other processes.

    Args:
        cores: logical CPUs.
        system_busy: CPU time used by everything over the last interval, in cores (0..cores).
        own_busy: CPU time used by this process over the same interval, in cores.
        max_threads: upper bound (the configured or default thread count).
        reserve: cores left for this process's other threads.

    Returns:
        ``clamp(cores - taken - reserve, 1, max_threads)`` where ``taken`` counts the others' load
        in whole cores, a core counting from :data:`BUSY_CORE_THRESHOLD`.
    """
    others = max(0.0, system_busy - own_busy)
    taken = math.floor(others + (1.0 - BUSY_CORE_THRESHOLD))
    return max(1, min(max_threads, cores - taken - reserve))


class ThreadPolicy:
    """Reads system and own CPU use with psutil and applies :func:`choose_threads`.

    The first call samples over ``first_interval_s`` (blocking); later calls use the time since the
    previous call.

    Args:
        max_threads: upper bound (default: all logical CPUs).
        reserve: cores kept for the node's own threads (event loop, token hand-off).
        first_interval_s: sampling window of the first call, seconds.
    """

    def __init__(self, max_threads: int | None = None, reserve: int = 1, first_interval_s: float = 0.25) -> None:
        self.cores = os.cpu_count() or 1
        self.max_threads = max_threads or self.cores
        self.reserve = reserve
        self._first_interval_s = first_interval_s
        self._proc = psutil.Process()
        self._primed = False

    def __call__(self) -> int:
        if not self._primed:
            self._primed = True
            self._proc.cpu_percent(None)
            system = psutil.cpu_percent(self._first_interval_s)
        else:
            system = psutil.cpu_percent(None)
        own = self._proc.cpu_percent(None)
        return choose_threads(self.cores, system / 100 * self.cores, own / 100, self.max_threads, self.reserve)
