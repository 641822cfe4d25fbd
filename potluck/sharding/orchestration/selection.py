"""Choosing a tensor-parallel group's workers from the swarm's cluster state (the master's side).

Candidates are the live records of this swarm's peers that are not excluded for recent failures
(:meth:`~potluck.sharding.orchestration.ports.SwarmPort.candidates`), ranked by lowest RTT, then
highest measured speed, then most free RAM (:func:`rank_candidates`): link latency, not bandwidth,
dominates a star all-reduce at these sizes (TPI-LLM, Li et al. 2024, §3.3). With an explicit
world size the best ``N - 1`` are taken. Otherwise the cost model chooses: for the master alone
and for it with the best 1, 2, ... candidates, :func:`~potluck.sharding.orchestration.forecast.forecast_group`
predicts ms/token from the bandwidths, memory budgets and RTTs the members advertise or we measured
(a rank whose share exceeds its budget streams layers from disk; a group where some rank cannot
hold even one layer is infeasible), and :func:`~potluck.sharding.orchestration.forecast.pick` takes
the fewest within 5 % of the fastest.

Shares are planned by speed with the memory caps lifted (:data:`~potluck.sharding.format.plan.DISK_BACKED`):
each rank's budget decides how much of its share stays resident, not whether it may take it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from gguf import GGUFReader

from potluck.config import DEFAULT_BUDGET_FRACTION
from potluck.errors import ShardPlanError
from potluck.identity import PeerId
from potluck.sharding.format.cost import DEFAULT_DISK_BW, DEFAULT_MEMORY_BW, DEFAULT_RTT_S
from potluck.sharding.format.plan import DISK_BACKED, NodeCapability
from potluck.sharding.orchestration.context import SwarmContext
from potluck.sharding.orchestration.forecast import (
    LINKS,
    Device,
    GroupForecast,
    ModelSizes,
    forecast_group,
    pick,
)
from potluck.sharding.orchestration.ports import PeerView

log = logging.getLogger(__name__)

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
        memory_budget: resident bytes it gives a rank (0: not set, i.e. 80 % of its free RAM).
        memory_bw, disk_bw: its measured bandwidths, bytes/s (0: unknown).
    """

    peer_id: PeerId
    ram_free: int
    decode_tps: float
    cores: int
    rtt_s: float | None
    memory_budget: int = 0
    memory_bw: float = 0.0
    disk_bw: float = 0.0

    @classmethod
    def of(cls, peer: PeerView) -> Candidate:
        return cls(
            peer.peer_id,
            peer.ram_free,
            peer.decode_tps,
            peer.cores,
            peer.rtt_s,
            peer.memory_budget,
            peer.memory_bw,
            peer.disk_bw,
        )

    def device(self, speed: float, master: bool) -> Device:
        """The cost model's view of it, unknown figures replaced by the defaults of
        :mod:`potluck.sharding.format.cost`."""
        budget = self.memory_budget or int(self.ram_free * DEFAULT_BUDGET_FRACTION)
        rtt = 0.0 if master else (DEFAULT_RTT_S if self.rtt_s is None else self.rtt_s)
        return Device(
            self.peer_id, budget, self.memory_bw or DEFAULT_MEMORY_BW, self.disk_bw or DEFAULT_DISK_BW, speed, rtt
        )


def rank_candidates(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Best first: lowest RTT (unmeasured last), then highest measured speed, then most free RAM."""
    return sorted(
        candidates,
        key=lambda c: (math.inf if c.rtt_s is None else c.rtt_s, -c.decode_tps, -c.ram_free, c.peer_id),
    )


def capabilities(me: Candidate, workers: Sequence[Candidate]) -> list[NodeCapability]:
    """Planner inputs, master first. Speeds are the measured decode tokens/s when every member has
    one (they are then comparable enough to split by), else the core counts. Memory caps are
    lifted (:data:`DISK_BACKED`): a rank streams what its budget does not hold."""
    members = [me, *workers]
    by_tps = all(m.decode_tps > 0 for m in members)
    return [NodeCapability(m.peer_id, DISK_BACKED, m.decode_tps if by_tps else float(max(1, m.cores))) for m in members]


def devices(me: Candidate, workers: Sequence[Candidate]) -> list[Device]:
    """The cost model's inputs, master first, with the planner's speeds."""
    speeds = [c.speed for c in capabilities(me, workers)]
    return [m.device(speed, r == 0) for r, (m, speed) in enumerate(zip([me, *workers], speeds, strict=True))]


def forecast_groups(model: ModelSizes, me: Candidate, others: Sequence[Candidate]) -> list[GroupForecast]:
    """Predictions for ``me`` as master alone and with each prefix of ``others`` (best first, see
    :func:`rank_candidates`), over links of the measured RTTs and an assumed 1 Gbit/s (group sizes
    the planner cannot split the model over are left out)."""
    out = []
    for k in range(len(others) + 1):
        try:
            out.append(forecast_group(model, devices(me, others[:k]), LINKS["wired"].bandwidth))
        except ShardPlanError:
            continue
    return out


class WorkerSelector:
    """Picks workers for a group of ``want`` ranks (called from the group's blocking thread).

    Args:
        ctx: the node-side context (swarm port, loop, join deadline, stop flag, the master's budget).
        reader: the model's GGUF (for the forecasts).
        path: the GGUF file.
        n_ctx: KV-cache length of every rank, tokens.
        want: ranks wanted, master included (0: the group the cost model predicts fastest).
    """

    def __init__(self, ctx: SwarmContext, reader: GGUFReader, path: Path, n_ctx: int, want: int) -> None:
        self.ctx = ctx
        self.reader = reader
        self.path = path
        self.n_ctx = n_ctx
        self.want = want
        self._sizes: ModelSizes | None = None

    def me(self) -> Candidate:
        """This node as the master: its advertised speed and bandwidths, the RAM available now and
        the budget its own rank runs under."""
        local = Candidate.of(self.ctx.overlay.local_peer())
        free = int(psutil.virtual_memory().available)
        return replace(local, ram_free=free, rtt_s=0.0, memory_budget=self.ctx.memory_budget)

    def plan_inputs(self, workers: Sequence[Candidate]) -> list[NodeCapability]:
        """The planner's inputs for this node as master and ``workers``."""
        return capabilities(self.me(), workers)

    def _snapshot(self) -> list[Candidate]:
        peers = self.ctx.call(self.ctx.overlay.candidates(), 10.0)
        return [Candidate.of(p) for p in peers]

    def forecasts(self, others: Sequence[Candidate]) -> list[GroupForecast]:
        """:func:`forecast_groups` with this node as the master."""
        if self._sizes is None:
            self._sizes = ModelSizes.of(self.reader, self.path, self.n_ctx)
        return forecast_groups(self._sizes, self.me(), others)

    def _best(self, keep: list[Candidate], others: list[Candidate]) -> list[Candidate] | None:
        """``keep`` plus the prefix of ``others`` the cost model picks (``None``: no group is feasible)."""
        members = keep + others
        rows = [f for f in self.forecasts(members) if f.nodes > len(keep)]
        best = pick(rows)
        log.info(
            "tensor-parallel planner: %s",
            "; ".join(
                f"{f.nodes} rank(s) {f.s_per_token * 1e3:.1f} ms/token, window {f.window}/{f.layers}"
                if f.feasible
                else f"{f.nodes} rank(s) infeasible ({f.short})"
                for f in rows
            )
            + (f" -> {best.nodes} ranks" if best else " -> none yet"),
        )
        return None if best is None else members[: best.nodes - 1]

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
                best = self._best(keep, others)
                if best is not None:
                    return best
                if not wait:
                    return keep + others
            if time.monotonic() >= deadline:
                found = len(keep) + len(others)
                raise ShardPlanError(
                    f"found {found} willing tensor-parallel peer(s) in the swarm within "
                    f"{self.ctx.join_timeout_s:.0f} s; the group needs "
                    + (f"{self.want - 1}" if self.want >= 1 else "more memory than they offer (see the planner's log)")
                )
            time.sleep(_POLL_S)
