"""A tensor-parallel group formed from peers of the swarm (the master's side): forming and recovery.

:class:`SwarmGroup` is a :class:`~potluck.sharding.orchestration.group.TPGroup` whose workers are other potluck
nodes (TPI-LLM, Li et al. 2024, §3; the ARCHITECTURE's "Tensor parallelism"). Its jobs are split:

- choosing workers from the signed cluster state: :mod:`potluck.sharding.orchestration.selection`;
- bringing one group up over them (plan, shards, ``tp_join``, star admission, shard transfer, ready
  barrier): :mod:`potluck.sharding.orchestration.formation`;
- here: re-forming while workers refuse or fail to join, and recovering from a failure later.

A worker that refuses, cannot be reached or fails while joining is excluded (capped backoff in the
overlay) and the group is re-formed without it. A worker that fails later raises
:class:`~potluck.errors.PeerFailed` in the engine; :meth:`SwarmGroup.recover` re-plans over the
survivors (topped up once from the swarm; after a failed join, only the members that did not fail),
down to the master alone when it can hold the model, and
:func:`~potluck.sharding.orchestration.group.generate_ids` replays the request.

Threads: the group is driven from one blocking thread (the backend's load and generation thread);
swarm calls cross to the node's asyncio loop (:meth:`SwarmContext.call`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from potluck.errors import GenerationError, PeerFailed, PotluckError, ShardPlanError
from potluck.retry import Backoff, RetryPolicy
from potluck.sharding.collective.star import StarMaster
from potluck.sharding.compute.engine import TPMaster
from potluck.sharding.format.gguf_tensors import open_gguf
from potluck.sharding.format.plan import ShardPlan
from potluck.sharding.orchestration.context import SwarmContext
from potluck.sharding.orchestration.formation import JoinFailed as _JoinFailed
from potluck.sharding.orchestration.formation import form_group
from potluck.sharding.orchestration.selection import Candidate, WorkerSelector

log = logging.getLogger(__name__)

#: Re-formations tried when workers refuse or fail while joining.
MAX_FORM_ATTEMPTS = 4


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (the model's content address).

    Returns:
        64 lowercase hex digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


class SwarmGroup:
    """Master in this node, workers on swarm peers (see the module docstring).

    Args:
        ctx: the node-side context.
        model_path: the GGUF (only the master needs it).
        n_ctx: KV-cache length of every rank, tokens.
        world_size: ranks wanted, master included (>= 1; 0: as few as the memory check needs).

    Raises:
        ShardPlanError: not enough willing peers, or their memory cannot hold the model.
        GenerationError: the group could not be formed.
    """

    def __init__(self, ctx: SwarmContext, model_path: Path, n_ctx: int, world_size: int) -> None:
        self.ctx = ctx
        self.path = Path(model_path)
        self.reader = open_gguf(self.path)
        self.n_ctx = n_ctx
        self.want = world_size
        self.model_sha256 = file_sha256(self.path)
        self.selector = WorkerSelector(ctx, self.reader, self.path, n_ctx, world_size)
        self.workers: list[Candidate] = []
        self.star: StarMaster | None = None
        self.plan: ShardPlan | None = None
        self.transport_used: dict[int, str] = {}
        self._master = self._start(initial=True)

    @property
    def master(self) -> TPMaster:
        return self._master

    @property
    def world_size(self) -> int:
        return 1 + len(self.workers)

    def _choose(self, keep: list[Candidate], wait: bool) -> list[Candidate]:
        return self.selector.choose(keep, wait)

    # ------------------------------------------------------------------ forming the group
    def _start(self, initial: bool, keep: list[Candidate] | None = None) -> TPMaster:
        workers = self._choose(keep or [], wait=initial)
        # 0.2 s, 0.4 s, 0.8 s between the attempts (potluck.retry); only a failed join is retried.
        policy = RetryPolicy(Backoff(first_s=0.2, max_s=1.0), attempts=MAX_FORM_ATTEMPTS, retry_on=(_JoinFailed,))
        try:
            for attempt in policy.retrying(log, "forming the tensor-parallel group"):
                with attempt:
                    if initial and attempt.retry_state.attempt_number > 1:
                        # Forming: wait for a replacement (an explicit --tensor-parallel N means N ranks).
                        # Recovering mid-request: go on with the members that did not fail, without
                        # topping up again: a peer whose record has not expired yet may be as dead as
                        # the one that failed, and every such try costs a dial timeout.
                        workers = self._choose(workers, wait=True)
                    try:
                        return self._form(workers)
                    except _JoinFailed as exc:
                        failed = workers[exc.rank - 1]
                        log.warning("tensor-parallel peer %s failed to join (%s); re-forming without it",
                                    failed.peer_id, exc)  # fmt: skip
                        self.ctx.loop.call_soon_threadsafe(self.ctx.overlay.record_failure, failed.peer_id)
                        workers = [w for w in workers if w.peer_id != failed.peer_id]
                        raise
        except _JoinFailed as exc:
            # The peers left may simply be too few: choosing once more raises ShardPlanError naming
            # the shortfall ("the group needs N"), which says more than the attempt count.
            self._choose(workers, wait=initial)
            raise GenerationError(f"no tensor-parallel group formed after {MAX_FORM_ATTEMPTS} attempts") from exc
        raise AssertionError("unreachable")

    def _form(self, workers: list[Candidate]) -> TPMaster:
        formed = form_group(
            self.ctx, self.reader, self.path, self.n_ctx, self.model_sha256, self.selector.plan_inputs(workers), workers
        )
        plan = formed.plan
        if formed.star is None:
            self.workers, self.plan, self.star, self.transport_used = [], plan, None, {}
            log.info("tensor-parallel group up: 1 rank (the master alone), plan %s", plan.plan_id)
            return formed.master
        self.workers, self.plan, self.star, self.transport_used = workers, plan, formed.star, formed.transport_used
        log.info(
            "tensor-parallel group up: %d ranks (%s), plan %s",
            plan.world_size,
            ", ".join(f"rank {r} {w.peer_id[-8:]} via {self.transport_used.get(r)}" for r, w in enumerate(workers, 1)),
            plan.plan_id,
        )
        return formed.master

    # ------------------------------------------------------------------ failures
    def recover(self, failure: PeerFailed) -> TPMaster:
        """Drop the failed worker, re-plan over the survivors (topped up from the swarm when
        possible, down to the master alone) and return the new master.

        Raises:
            GenerationError: no group can be formed (e.g. the master alone cannot hold the model).
        """
        if not 0 < failure.rank <= len(self.workers):
            raise GenerationError(f"cannot recover from a failure of rank {failure.rank}") from failure
        failed = self.workers[failure.rank - 1]
        log.warning("tensor-parallel rank %d (%s) failed: %s; re-planning", failure.rank, failed.peer_id, failure)
        self.ctx.loop.call_soon_threadsafe(self.ctx.overlay.record_failure, failed.peer_id)
        survivors = [w for w in self.workers if w.peer_id != failed.peer_id]
        self._stop()
        try:
            self._master = self._start(initial=False, keep=survivors)
        except ShardPlanError as exc:
            raise GenerationError(f"no tensor-parallel group can be re-formed: {exc}") from exc
        return self._master

    def _stop(self) -> None:
        if self.star is not None:
            self.star.close()  # survivors' sessions end on the CLOSE frame
            self.star = None
        self.workers = []

    def close(self) -> None:
        """Tell the workers to stop and close the star (best effort)."""
        try:
            self._master.shutdown()
        except PotluckError as exc:
            log.debug("tensor-parallel shutdown: %s", exc)
        self._stop()
