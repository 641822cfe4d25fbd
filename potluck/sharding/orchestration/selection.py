"""Choosing a tensor-parallel group's workers from the swarm's cluster state (the master's side).

Candidates are the live records of this swarm's peers that are not excluded for recent failures
(:meth:`~potluck.sharding.orchestration.ports.SwarmPort.candidates`), ranked by lowest RTT, then
highest measured speed, then most free RAM (:func:`rank_candidates`): link latency, not bandwidth,
dominates a star all-reduce at these sizes (TPI-LLM, Li et al. 2024, §3.3). With an explicit
world size the best ``N - 1`` are taken; otherwise the fewest that make the planner's memory check
pass (:func:`~potluck.sharding.format.plan.make_plan`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from gguf import GGUFReader

from potluck.errors import ShardPlanError
from potluck.identity import PeerId
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.orchestration.context import SwarmContext
from potluck.sharding.orchestration.group import plan_for
from potluck.sharding.orchestration.ports import PeerView

_POLL_S = 0.5


@dataclass(frozen=True)
class Candidate:
    """A peer that could be a worker, as the cluster state and our link measurements describe it.

    Attributes:
        peer_id: its libp2p peer ID.
        ram_free: free RAM it advertises, bytes.
        decode_tps: decode tokens/s it measured on its own model (0: unknown).
        cores: CPU cores it advertises.
        rtt_s: our measured round trip to it, seconds (``None``: not measured yet).
    """

    peer_id: PeerId
    ram_free: int
    decode_tps: float
    cores: int
    rtt_s: float | None

    @classmethod
    def of(cls, peer: PeerView) -> Candidate:
        return cls(peer.peer_id, peer.ram_free, peer.decode_tps, peer.cores, peer.rtt_s)


def rank_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best first: lowest RTT (unmeasured last), then highest measured speed, then most free RAM."""
    return sorted(
        candidates,
        key=lambda c: (math.inf if c.rtt_s is None else c.rtt_s, -c.decode_tps, -c.ram_free, c.peer_id),
    )


def capabilities(me: Candidate, workers: Sequence[Candidate]) -> list[NodeCapability]:
    """Planner inputs, master first. Speeds are the measured decode tokens/s when every member has
    one (they are then comparable enough to split by), else the core counts."""
    members = [me, *workers]
    by_tps = all(m.decode_tps > 0 for m in members)
    return [NodeCapability(m.peer_id, m.ram_free, m.decode_tps if by_tps else float(max(1, m.cores))) for m in members]


class WorkerSelector:
    """Picks workers for a group of ``want`` ranks (called from the group's blocking thread).

    Args:
        ctx: the node-side context (swarm port, loop, join deadline, stop flag).
        reader: the model's GGUF (for the planner's memory check).
        path: the GGUF file.
        n_ctx: KV-cache length of every rank, tokens.
        want: ranks wanted, master included (0: as few as the memory check needs).
    """

    def __init__(self, ctx: SwarmContext, reader: GGUFReader, path: Path, n_ctx: int, want: int) -> None:
        self.ctx = ctx
        self.reader = reader
        self.path = path
        self.n_ctx = n_ctx
        self.want = want

    def me(self) -> Candidate:
        """This node as the master: its advertised speed and the RAM available now."""
        local = self.ctx.overlay.local_peer()
        return Candidate(local.peer_id, int(psutil.virtual_memory().available), local.decode_tps, local.cores, 0.0)

    def plan_inputs(self, workers: Sequence[Candidate]) -> list[NodeCapability]:
        """The planner's inputs for this node as master and ``workers``."""
        return capabilities(self.me(), workers)

    def _snapshot(self) -> list[Candidate]:
        peers = self.ctx.call(self.ctx.overlay.candidates(), 10.0)
        return [Candidate.of(p) for p in peers]

    def _fits(self, workers: Sequence[Candidate]) -> bool:
        try:
            plan_for(self.reader, self.path, self.plan_inputs(workers), self.n_ctx)
        except ShardPlanError:
            return False
        return True

    def choose(self, keep: list[Candidate], wait: bool) -> list[Candidate]:
        """``keep`` topped up with the best other candidates, up to ``want - 1`` workers (or, with
        ``want == 0``, up to the fewest that make the plan fit). With ``wait``, polls the cluster
        state until enough candidates are there or the join deadline passes.

        Raises:
            ShardPlanError: not enough candidates before the deadline.
            ClosedError: the node is shutting down.
        """
        deadline = time.monotonic() + self.ctx.join_timeout_s
        kept = {c.peer_id for c in keep}
        while True:
            self.ctx.check_stop()
            others = [c for c in rank_candidates(self._snapshot()) if c.peer_id not in kept]
            if self.want >= 1:
                chosen = keep + others[: max(0, self.want - 1 - len(keep))]
                if len(chosen) >= self.want - 1 or not wait:
                    return chosen
            else:
                for n in range(len(keep), len(keep) + len(others) + 1):
                    chosen = keep + others[: n - len(keep)]
                    if self._fits(chosen):
                        return chosen
                if not wait:
                    return keep + others
            if time.monotonic() >= deadline:
                found = len(keep) + len(others)
                raise ShardPlanError(
                    f"found {found} willing tensor-parallel peer(s) in the swarm within "
                    f"{self.ctx.join_timeout_s:.0f} s; the group needs "
                    + (f"{self.want - 1}" if self.want >= 1 else "more memory than they offer")
                )
            time.sleep(_POLL_S)
