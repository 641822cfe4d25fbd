"""Run a tensor-parallel group as real processes on this machine over the TCP star.

:class:`ProcessGroup` plans the model over ``N`` local "nodes", writes each worker's shard file
(cached under ``shard_dir`` by model id, plan id and rank), binds a
:class:`~potluck.sharding.collective.star.StarMaster`, starts ``N - 1`` worker processes
(``python -m potluck.sharding.orchestration.worker``) with the random session key on their stdin, and admits them.
On a :class:`PeerFailed` it stops the group, drops the failed node and starts again over the
survivors (down to the master alone), which is what :func:`potluck.sharding.orchestration.group.generate_ids`
needs to replay a request.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from potluck.errors import GenerationError, PeerFailed, PotluckError
from potluck.sharding.collective import auth
from potluck.sharding.collective.star import DEFAULT_POLL_S, StarMaster
from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.format.extract import extract_shard_to
from potluck.sharding.format.gguf_tensors import open_gguf
from potluck.sharding.format.pages import trim_heap
from potluck.sharding.format.plan import NodeCapability, ShardPlan
from potluck.sharding.format.shard_file import ShardData, read_shard
from potluck.sharding.orchestration.group import plan_for

log = logging.getLogger(__name__)

#: How long worker processes get to load their shard and connect, in seconds.
STARTUP_TIMEOUT_S = 120.0
_STOP_GRACE_S = 5.0


def shard_path(shard_dir: Path, plan: ShardPlan, rank: int) -> Path:
    """Cache path of rank ``rank``'s shard under ``plan``."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in plan.model_id)
    return shard_dir / f"{stem}-{plan.plan_id}-r{rank}.pshard"


def write_worker_shards(reader, plan: ShardPlan, shard_dir: Path) -> list[Path]:
    """Extract and write ranks 1..N-1's shard files (reusing cached ones); returns their paths."""
    return [_shard_file(reader, plan, shard_dir, rank) for rank in range(1, plan.world_size)]


def master_shard(reader, plan: ShardPlan, shard_dir: Path) -> ShardData:
    """Rank 0's shard, streamed to (or reused from) its file in ``shard_dir`` and memory-mapped: the
    master never holds its whole shard in memory (its weights leave memory once compiled, and
    embedding rows are read from the file as tokens need them)."""
    return read_shard(_shard_file(reader, plan, shard_dir, 0))


def _shard_file(reader, plan: ShardPlan, shard_dir: Path, rank: int) -> Path:
    path = shard_path(shard_dir, plan, rank)
    if not path.is_file():
        size = extract_shard_to(reader, plan, rank, path)
        trim_heap()  # the decoded slices are on disk; glibc would keep their freed memory
        log.info("wrote %s (%.1f MB)", path, size / 1e6)
    return path


class ProcessGroup:
    """Master in this process, ``len(nodes) - 1`` workers as child processes over TCP.

    Args:
        model_path: GGUF file (the master holds it; workers get shard files).
        nodes: capabilities in rank order (first is the master).
        options: engine options of every rank (``n_ctx``, ``accuracy_level``, the memory budget and
            spill directory; threads per rank are derived from the cores the co-located ranks share).
        shard_dir: where worker shard files are written.
        timeout_s: collective deadline: a dead or stalled worker is noticed within it.
        cores: CPU cores the ranks share (default: ``os.cpu_count()``).
        host: address the master's :class:`StarMaster` listens on; the workers connect to it.
        worker_prefix: argv prefix of worker ``rank``'s command (e.g. ``["ip", "netns", "exec",
            NAME]`` to run it in a network namespace); ``None``: no prefix.
    """

    def __init__(
        self,
        model_path: Path,
        nodes: Sequence[NodeCapability],
        options: EngineOptions,
        shard_dir: Path,
        timeout_s: float = 10.0,
        cores: int | None = None,
        host: str = "127.0.0.1",
        worker_prefix: Callable[[int], Sequence[str]] | None = None,
    ) -> None:
        self.path = Path(model_path)
        self.reader = open_gguf(self.path)
        self.shard_dir = Path(shard_dir)
        if options.memory_budget and options.spill_dir is None:
            options = replace(options, spill_dir=self.shard_dir / "spill")
        self.options = options
        self.timeout_s = timeout_s
        self.cores = cores or os.cpu_count() or 1
        self.host = host
        self.worker_prefix = worker_prefix
        self.nodes = list(nodes)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.star: StarMaster | None = None
        self._master = self._start()

    @property
    def master(self) -> TPMaster:
        return self._master

    def _start(self) -> TPMaster:
        plan = plan_for(self.reader, self.path, self.nodes, self.options.n_ctx)
        self.plan = plan
        n = plan.world_size
        threads = max(1, self.cores // n)
        rank_options = replace(self.options, threads=threads, spinning=self.options.spinning if n == 1 else False)
        paths = write_worker_shards(self.reader, plan, self.shard_dir)
        if n > 1:
            key = auth.new_session_key()
            poll_s = DEFAULT_POLL_S if n <= self.cores else 0.0  # spin only where every rank has a core
            self.star = StarMaster(n, key, host=self.host, timeout_s=self.timeout_s, poll_s=poll_s)
            host, port = self.star.address
            for rank, path in enumerate(paths, start=1):
                cmd = [
                    *(self.worker_prefix(rank) if self.worker_prefix else ()),
                    sys.executable,
                    "-m",
                    "potluck.sharding.orchestration.worker",
                    "--connect",
                    f"{host}:{port}",
                    "--rank",
                    str(rank),
                    "--world-size",
                    str(n),
                    "--shard",
                    str(path),
                    "--threads",
                    str(threads),
                    "--accuracy-level",
                    str(self.options.accuracy_level),
                    "--attention",
                    self.options.attention,
                    "--timeout",
                    str(self.timeout_s),
                    "--poll-us",
                    str(poll_s * 1e6),
                    *self._memory_args(),
                ]
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
                assert proc.stdin is not None
                proc.stdin.write(key.hex().encode() + b"\n")
                proc.stdin.close()
                self.procs[rank] = proc
        try:
            shard0 = master_shard(self.reader, plan, self.shard_dir)
            master = TPMaster(RankCompute.from_shard(shard0, rank_options), shard0, self.star)
        except BaseException:
            self._stop_all()  # the workers started above must not outlive a master that failed to load
            raise
        if self.star is not None:
            try:
                self.star.accept_workers(STARTUP_TIMEOUT_S)
            except PotluckError as exc:
                self._stop_all()
                raise GenerationError(f"workers did not join the group: {exc}") from exc
        log.info("tensor-parallel group up: %d ranks, plan %s", n, plan.plan_id)
        return master

    def _memory_args(self) -> list[str]:
        """The workers' ``--memory-budget`` / ``--spill-dir`` / ``--drop-cache`` (the master's own)."""
        o = self.options
        if not o.memory_budget:
            return []
        args = ["--memory-budget", str(o.memory_budget), "--spill-dir", str(o.spill_dir)]
        return [*args, "--drop-cache"] if o.drop_cache else args

    def pid(self, rank: int) -> int:
        """Process id of worker ``rank`` (tests kill it)."""
        return self.procs[rank].pid

    def recover(self, failure: PeerFailed) -> TPMaster:
        """Stop the group, drop the failed node, start over the survivors.

        Raises:
            GenerationError: the failed rank is not a worker, or the new group fails to start.
        """
        if not 0 < failure.rank < len(self.nodes):
            raise GenerationError(f"cannot recover from a failure of rank {failure.rank}") from failure
        log.warning("rank %d failed (%s); re-planning over %d nodes", failure.rank, failure, len(self.nodes) - 1)
        failed = self.procs.get(failure.rank)
        if failed is not None and failed.poll() is None:
            failed.kill()  # declared dead: a stalled worker must not come back into the group
        self._stop_all()
        del self.nodes[failure.rank]
        self._master = self._start()
        return self._master

    def _stop_all(self) -> None:
        if self.star is not None:
            self.star.close()
            self.star = None
        for proc in self.procs.values():
            try:
                proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = {}

    def close(self) -> None:
        """Tell the workers to stop, then reap them (killing any that linger)."""
        try:
            self._master.shutdown()
        except PotluckError as exc:
            log.debug("shutdown: %s", exc)
        self.star = None
        self._stop_all()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
