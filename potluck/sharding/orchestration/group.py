"""A tensor-parallel group: plan, shards, master and workers, and generation that survives failures.

:class:`TPGroup` is the seam between generation and how the workers run. :class:`ThreadGroup` runs
the workers as threads over :class:`~potluck.sharding.collective.in_process.LocalStar` (unit tests); the process
launcher in :mod:`potluck.sharding.orchestration.launch` runs them as processes over the TCP star.

Failure (the issue's requirement 6): when a worker dies or stalls, the collective raises
:class:`PeerFailed` within its ``timeout_s``; :func:`generate_ids` asks the group to
:meth:`TPGroup.recover` (re-plan over the surviving nodes, down to the master alone) and replays
the prompt plus the tokens produced so far into the new group, so the caller sees one completion.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from gguf import GGUFReader

from potluck.errors import GenerationError, PeerFailed, PotluckError
from potluck.routing.request import SamplingParams
from potluck.sharding.collective.in_process import LocalStar
from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster, serve_worker
from potluck.sharding.compute.sampling import Sampler
from potluck.sharding.format.extract import extract_shard, plan_geometry
from potluck.sharding.format.gguf_tensors import open_gguf, read_config
from potluck.sharding.format.plan import NodeCapability, ShardPlan, make_plan

log = logging.getLogger(__name__)


def model_file_key(path: Path) -> str:
    """A cheap key of a model file, ``"<file name>:<size in bytes>"`` (the plan's ``model_id``);
    not a content hash (that is the SHA-256 a swarm group sends its workers)."""
    return f"{path.name}:{path.stat().st_size}"


def plan_for(reader: GGUFReader, path: Path, nodes: Sequence[NodeCapability], n_ctx: int) -> ShardPlan:
    """Plan ``reader``'s model over ``nodes`` (first is the master)."""
    config = read_config(reader)
    return make_plan(plan_geometry(reader, config, n_ctx), list(nodes), model_file_key(path), config.n_heads, n_ctx)


class TPGroup(Protocol):
    """A running tensor-parallel group."""

    @property
    def master(self) -> TPMaster: ...

    def recover(self, failure: PeerFailed) -> TPMaster:
        """Drop the failed member, re-plan over the survivors and return the new master.

        Raises:
            GenerationError: no working group can be formed.
        """
        ...

    def close(self) -> None: ...


class ThreadGroup:
    """Master in the calling thread, workers in threads, over a :class:`LocalStar`.

    Args:
        model_path: GGUF file.
        nodes: capabilities, rank order (first is the master).
        options: engine options for every rank.
        timeout_s: collective deadline.
    """

    def __init__(
        self,
        model_path: Path,
        nodes: Sequence[NodeCapability],
        options: EngineOptions,
        timeout_s: float = 10.0,
    ) -> None:
        self.path = Path(model_path)
        self.reader = open_gguf(self.path)
        self.options = options
        self.timeout_s = timeout_s
        self.nodes = list(nodes)
        self.star: LocalStar | None = None
        self.threads: list[threading.Thread] = []
        self.worker_errors: dict[int, BaseException] = {}
        self._master = self._start()

    @property
    def master(self) -> TPMaster:
        return self._master

    def _start(self) -> TPMaster:
        plan = plan_for(self.reader, self.path, self.nodes, self.options.n_ctx)
        self.plan = plan
        self.star = LocalStar(plan.world_size, timeout_s=self.timeout_s) if plan.world_size > 1 else None
        for rank in range(1, plan.world_size):
            compute = RankCompute.from_shard(extract_shard(self.reader, plan, rank), self.options)
            member = self.star.members[rank]  # type: ignore[union-attr]
            thread = threading.Thread(target=self._run_worker, args=(member, compute), name=f"tp-worker-{rank}")
            thread.start()
            self.threads.append(thread)
        shard0 = extract_shard(self.reader, plan, 0)
        return TPMaster(
            RankCompute.from_shard(shard0, self.options), shard0, self.star.members[0] if self.star else None
        )

    def _run_worker(self, member, compute: RankCompute) -> None:
        try:
            serve_worker(member, compute)
        except PotluckError as exc:  # recorded for the test/owner; the master sees PeerFailed
            self.worker_errors[member.rank] = exc
            log.info("worker %d ended: %s", member.rank, exc)
        finally:
            member.close()

    def kill(self, rank: int) -> None:
        """Simulate a crash of worker ``rank`` (tests)."""
        if self.star is not None:
            self.star.kill(rank)

    def recover(self, failure: PeerFailed) -> TPMaster:
        if not 0 < failure.rank < len(self.nodes):
            raise GenerationError(f"cannot recover from a failure of rank {failure.rank}") from failure
        log.warning("rank %d failed (%s); re-planning over %d nodes", failure.rank, failure, len(self.nodes) - 1)
        self._stop_all()
        del self.nodes[failure.rank]
        self._master = self._start()
        return self._master

    def _stop_all(self) -> None:
        if self.star is not None:
            for m in self.star.members:
                m.close()
        for t in self.threads:
            t.join(timeout=self.timeout_s)
        self.threads = []

    def close(self) -> None:
        try:
            self._master.shutdown()
        except PotluckError as exc:
            log.debug("shutdown: %s", exc)
        self._stop_all()


def generate_ids(
    group: TPGroup,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: set[int],
    cancel: threading.Event | None = None,
    max_recoveries: int = 4,
) -> Iterator[int]:
    """Sample up to ``params.max_tokens`` ids after ``prompt_ids``; survives worker failures.

    Reuses the master's KV cache for a prompt that shares a prefix with the previous one.

    Yields:
        Generated token ids (an id in ``eos_ids`` ends generation and is not yielded).

    Raises:
        RequestError: the prompt does not fit the context.
        GenerationError: recovery failed ``max_recoveries`` times or no group is left.
    """
    sampler = Sampler(params)
    produced: list[int] = []
    recoveries = 0
    master = group.master
    cached: list[int] = getattr(master, "cached_ids", [])
    common = 0
    while common < min(len(cached), len(prompt_ids) - 1) and cached[common] == prompt_ids[common]:
        common += 1
    pending, pos = prompt_ids[common:], common
    while True:
        try:
            logits = master.forward(pending, pos)
        except PeerFailed as exc:
            recoveries += 1
            if recoveries > max_recoveries:
                raise GenerationError(f"gave up after {max_recoveries} recoveries") from exc
            master = group.recover(exc)
            master.cached_ids = []
            pending, pos = prompt_ids + produced, 0  # replay everything into the new group
            continue
        master.cached_ids = (prompt_ids + produced)[: pos + len(pending)]
        token = sampler(logits[-1])
        if token in eos_ids or (cancel is not None and cancel.is_set()):
            return
        produced.append(token)
        yield token
        if len(produced) >= params.max_tokens:
            return
        pending, pos = [token], len(prompt_ids) + len(produced) - 1


class SoloGroup:
    """A group of one: the master holds every layer (the ONNX Runtime backend, N = 1)."""

    def __init__(self, master: TPMaster) -> None:
        self._master = master

    @property
    def master(self) -> TPMaster:
        return self._master

    def recover(self, failure: PeerFailed) -> TPMaster:
        raise GenerationError("a single-node group has no peers to lose") from failure

    def close(self) -> None:
        self._master.shutdown()
