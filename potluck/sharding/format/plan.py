"""Tensor-parallel shard planning: who holds which attention heads and FFN columns.

Megatron-LM's split (Shoeybi et al. 2019, §3, Fig. 3) as used by TPI-LLM (Li et al. 2024, §3.1):
every layer's attention is divided by *KV groups* (a KV head with its ``n_heads / n_kv_heads``
query heads, so GQA never needs K/V from another node) and the SwiGLU FFN by intermediate
*columns* in multiples of the quantization block (32), so quantized rows split on block
boundaries. Q/K/V and gate/up are column-parallel, o_proj and down row-parallel. Every layer is
split the same way; rank 0 (the master) also holds the token embeddings. The output head is
*vocab-parallel* (Megatron-LM's parallel output embedding, Shoeybi et al. 2019, §3): each rank holds
a slice of its rows, in proportion to its share, with the final norm, and computes that slice of
the logits; the master gathers them. So no rank holds the whole head (0.6 GB at a 128k vocabulary
and 8192 hidden in Q4), and its matmul is split like the layers'.

Shares follow the nodes' measured speed (decode is memory-bound, so work is counted in weight
bytes) within their free memory (water-filling, then integer units by largest remainder, then
repair of any node still over its memory). Coarse KV groups (3 nodes, 4 groups) are balanced by
giving the FFN columns to the nodes whose head share fell short.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import msgpack

from potluck.errors import ShardPlanError

PLAN_VERSION = 1
FFN_BLOCK = 32
#: Fraction of a node's free RAM the planner lets weights + KV cache take.
MEMORY_HEADROOM = 0.85
#: The memory a node offers when its rank may stream its layers from disk (a memory budget sizes
#: its window instead): shares then follow speed alone.
DISK_BACKED = 1 << 50


#: Version of the engine layout :mod:`potluck.sharding.format.extract` writes; part of
#: :attr:`ShardPlan.plan_id`. 2: exact MatMulNBits layouts for K-quants, Q4_1 and Q5_x (1 re-quantized them);
#: 3: every rank holds its slice of the output head (2: rank 0 held all of it).
SHARD_LAYOUT = 3


@dataclass(frozen=True)
class NodeCapability:
    """What a node offers to a tensor-parallel group.

    Attributes:
        node_id: peer ID (or any stable name in single-machine trials).
        free_ram_bytes: memory the node can give to weights and KV cache, in bytes.
        speed: measured decode speed (tokens/s of a reference model, or any consistent unit); > 0.
    """

    node_id: str
    free_ram_bytes: int
    speed: float


@dataclass(frozen=True)
class PlanGeometry:
    """Sizes the planner needs, per layer unless stated.

    Attributes:
        n_layers, n_kv_heads, group, head_dim, hidden, ffn: model geometry.
        kv_group_bytes: weight bytes of one KV group in one layer (its Q, K, V rows and o_proj columns).
        kv_cache_group_bytes: KV-cache bytes of one KV group in one layer at the planned context.
        ffn_block_bytes: weight bytes of 32 FFN columns in one layer (gate/up rows, down columns).
        replicated_bytes: bytes every rank holds regardless of its share (norms), whole model.
        master_bytes: extra bytes of rank 0 (token embeddings).
        vocab: vocabulary size (rows of the output head).
        head_row_bytes: bytes of one output-head row in the GGUF.
    """

    n_layers: int
    n_kv_heads: int
    group: int
    head_dim: int
    hidden: int
    ffn: int
    kv_group_bytes: int
    kv_cache_group_bytes: int
    ffn_block_bytes: int
    replicated_bytes: int
    master_bytes: int
    vocab: int = 0
    head_row_bytes: int = 0

    @property
    def n_ffn_blocks(self) -> int:
        return self.ffn // FFN_BLOCK


@dataclass(frozen=True)
class NodeShare:
    """One rank's slice of every layer.

    Attributes:
        rank: 0 is the master.
        node_id: the node holding it.
        kv_start, kv_count: KV groups ``[kv_start, kv_start + kv_count)``; query heads are
            ``[kv_start * group, (kv_start + kv_count) * group)``.
        ffn_start, ffn_count: FFN columns ``[ffn_start, ffn_start + ffn_count)``, multiples of 32.
        est_bytes: planned memory (weights + KV cache + head slice), in bytes.
        vocab_start, vocab_count: output-head rows (logits) ``[vocab_start, vocab_start + vocab_count)``.
    """

    rank: int
    node_id: str
    kv_start: int
    kv_count: int
    ffn_start: int
    ffn_count: int
    est_bytes: int
    vocab_start: int = 0
    vocab_count: int = 0


@dataclass(frozen=True)
class ShardPlan:
    """A versioned tensor-parallel plan. Serializes to msgpack or JSON (:meth:`to_dict`).

    Attributes:
        version: :data:`PLAN_VERSION`.
        model_id: identifies the weights (e.g. file name + size or content hash).
        n_layers, n_heads, n_kv_heads, head_dim, hidden, ffn: geometry the plan was made for.
        n_ctx: context length the KV-cache estimate assumes.
        shares: one per rank, in rank order.
        vocab: vocabulary size; the shares' vocab ranges tile ``[0, vocab)``.
        head_row_bytes: bytes of one output-head row in the GGUF (sizes each rank's head slice).
    """

    version: int
    model_id: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    n_ctx: int
    shares: tuple[NodeShare, ...]
    vocab: int = 0
    head_row_bytes: int = 0

    @property
    def world_size(self) -> int:
        return len(self.shares)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_cache_bytes(self, rank: int) -> int:
        """Bytes of rank ``rank``'s float16 K and V cache at :attr:`n_ctx` tokens, all layers."""
        return self.shares[rank].kv_count * self.n_layers * 2 * self.n_ctx * self.head_dim * 2

    def head_bytes(self, rank: int) -> int:
        """Bytes of rank ``rank``'s output-head rows in the GGUF."""
        return self.shares[rank].vocab_count * self.head_row_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shares"] = [asdict(s) for s in self.shares]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardPlan:
        """Parse and validate a plan.

        Raises:
            ShardPlanError: wrong version, unknown fields or an inconsistent split.
        """
        try:
            if data.get("version") != PLAN_VERSION:
                raise ShardPlanError(f"plan version {data.get('version')!r} is not {PLAN_VERSION}")
            shares = tuple(NodeShare(**s) for s in data["shares"])
            plan = cls(**{**data, "shares": shares})
        except (TypeError, KeyError) as exc:
            raise ShardPlanError(f"malformed shard plan: {exc}") from exc
        plan.validate()
        return plan

    def to_msgpack(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_msgpack(cls, raw: bytes) -> ShardPlan:
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData) as exc:
            raise ShardPlanError(f"shard plan is not valid msgpack: {exc}") from exc
        if not isinstance(data, dict):
            raise ShardPlanError("shard plan must be a map")
        return cls.from_dict(data)

    @property
    def plan_id(self) -> str:
        """Short content hash of the plan and :data:`SHARD_LAYOUT` (stable across processes), for
        the shard caches' keys: a shard cut by an older extraction is not reused."""
        canon = json.dumps({"layout": SHARD_LAYOUT, **self.to_dict()}, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canon).hexdigest()[:16]

    def validate(self) -> None:
        """Check that the shares tile the heads and FFN columns exactly.

        Raises:
            ShardPlanError: gaps, overlaps, misaligned FFN ranges or bad ranks.
        """
        if not self.shares or [s.rank for s in self.shares] != list(range(len(self.shares))):
            raise ShardPlanError("plan ranks must be 0..N-1 in order")
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ShardPlanError("plan head counts are inconsistent")
        kv = ffn = vocab = 0
        for s in self.shares:
            if s.kv_start != kv or s.kv_count < 0 or s.ffn_start != ffn or s.ffn_count < 0:
                raise ShardPlanError(f"rank {s.rank}'s share does not follow rank {s.rank - 1}'s")
            if s.vocab_start != vocab or s.vocab_count < 0:
                raise ShardPlanError(f"rank {s.rank}'s vocabulary range does not follow rank {s.rank - 1}'s")
            if s.ffn_start % FFN_BLOCK or s.ffn_count % FFN_BLOCK:
                raise ShardPlanError(f"rank {s.rank}'s FFN range is not a multiple of {FFN_BLOCK}")
            kv += s.kv_count
            ffn += s.ffn_count
            vocab += s.vocab_count
        if kv != self.n_kv_heads or ffn != self.ffn or vocab != self.vocab:
            raise ShardPlanError(
                f"plan covers {kv}/{self.n_kv_heads} KV groups, {ffn}/{self.ffn} FFN columns and "
                f"{vocab}/{self.vocab} vocabulary rows"
            )


def _water_fill(speeds: list[float], caps: list[float]) -> list[float]:
    """Fractions ``f_i = min(caps_i, lam * speeds_i)`` summing to 1 (caps are fractions of the model)."""
    n = len(speeds)
    fixed: dict[int, float] = {}
    while True:
        free = [i for i in range(n) if i not in fixed]
        left = 1.0 - sum(fixed.values())
        total_speed = sum(speeds[i] for i in free)
        if not free or total_speed <= 0:
            raise ShardPlanError("the nodes' memory cannot hold the model")
        over = [i for i in free if left * speeds[i] / total_speed > caps[i]]
        if not over:
            return [fixed.get(i, left * speeds[i] / total_speed) for i in range(n)]
        for i in over:
            fixed[i] = caps[i]


def _largest_remainder(targets: list[float], total: int) -> list[int]:
    """Integers summing to ``total``, each floor(target) or one more (Hamilton's method)."""
    scale = total / sum(targets) if sum(targets) > 0 else 0.0
    exact = [t * scale for t in targets]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (out[i] - exact[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def make_plan(
    geometry: PlanGeometry, nodes: list[NodeCapability], model_id: str, n_heads: int, n_ctx: int
) -> ShardPlan:
    """Split every layer across ``nodes`` (the first is the master, rank 0).

    Args:
        geometry: sizes from :func:`potluck.sharding.format.extract.plan_geometry`.
        nodes: participating nodes in rank order; ``speed > 0``, ``free_ram_bytes >= 0``.
        model_id: identifies the weights.
        n_heads: query heads (recorded in the plan).
        n_ctx: context length behind the KV-cache estimate.

    Returns:
        A validated :class:`ShardPlan`. A node may get zero KV groups and zero FFN columns.

    Raises:
        ShardPlanError: no nodes, bad speeds, or the nodes' memory cannot hold the model.
    """
    if not nodes:
        raise ShardPlanError("a plan needs at least one node")
    if any(not (n.speed > 0 and math.isfinite(n.speed)) for n in nodes):
        raise ShardPlanError("node speeds must be positive and finite")
    g = geometry
    unit_kv = g.n_layers * (g.kv_group_bytes + g.kv_cache_group_bytes)
    unit_ffn = g.n_layers * g.ffn_block_bytes
    total = g.n_kv_heads * unit_kv + g.n_ffn_blocks * unit_ffn
    caps = [
        n.free_ram_bytes * MEMORY_HEADROOM - g.replicated_bytes - (g.master_bytes if r == 0 else 0)
        for r, n in enumerate(nodes)
    ]
    if caps[0] < 0:
        raise ShardPlanError(
            f"the master ({nodes[0].node_id}) cannot hold the token embeddings "
            f"({g.master_bytes / 1e6:.1f} MB) in {nodes[0].free_ram_bytes / 1e6:.1f} MB"
        )
    need = total + g.vocab * g.head_row_bytes
    if sum(max(c, 0.0) for c in caps) < need:
        raise ShardPlanError(
            f"the {len(nodes)} nodes can give {sum(max(c, 0) for c in caps) / 1e6:.1f} MB, "
            f"the model's layers and head need {need / 1e6:.1f} MB"
        )
    frac = _water_fill([n.speed for n in nodes], [max(c, 0.0) / need for c in caps])
    # The head's rows follow the same fractions (its memory comes out of each node's cap first).
    vocab = _largest_remainder(frac, g.vocab) if g.vocab else [0] * len(nodes)
    caps = [c - v * g.head_row_bytes for c, v in zip(caps, vocab, strict=True)]
    kv = _largest_remainder(frac, g.n_kv_heads)
    # FFN work makes up each node's shortfall (or excess) from the coarse head split.
    ffn_target = [max(0.0, f * total - k * unit_kv) for f, k in zip(frac, kv, strict=False)]
    blocks = _largest_remainder(ffn_target if sum(ffn_target) > 0 else frac, g.n_ffn_blocks)
    _repair_memory(kv, blocks, caps, unit_kv, unit_ffn)
    shares, kv_at, ffn_at, vocab_at = [], 0, 0, 0
    for r, node in enumerate(nodes):
        est = kv[r] * unit_kv + blocks[r] * unit_ffn + g.replicated_bytes + vocab[r] * g.head_row_bytes
        est += g.master_bytes if r == 0 else 0
        ffn_range = (ffn_at * FFN_BLOCK, blocks[r] * FFN_BLOCK)
        shares.append(NodeShare(r, node.node_id, kv_at, kv[r], *ffn_range, int(est), vocab_at, vocab[r]))
        kv_at += kv[r]
        ffn_at += blocks[r]
        vocab_at += vocab[r]
    plan = ShardPlan(
        PLAN_VERSION,
        model_id,
        g.n_layers,
        n_heads,
        g.n_kv_heads,
        g.head_dim,
        g.hidden,
        g.ffn,
        n_ctx,
        tuple(shares),
        g.vocab,
        g.head_row_bytes,
    )
    plan.validate()
    return plan


def _repair_memory(kv: list[int], blocks: list[int], caps: list[float], unit_kv: int, unit_ffn: int) -> None:
    """Move units off nodes over their memory onto nodes with room (in place)."""

    def used(i: int) -> float:
        return kv[i] * unit_kv + blocks[i] * unit_ffn

    for _ in range(sum(kv) + sum(blocks) + 1):
        over = [i for i in range(len(kv)) if used(i) > caps[i]]
        if not over:
            return
        i = over[0]
        moved = False
        for counts, unit in ((blocks, unit_ffn), (kv, unit_kv)):
            if counts[i] == 0:
                continue
            room = [j for j in range(len(kv)) if j != i and caps[j] - used(j) >= unit]
            if room:
                j = max(room, key=lambda j: caps[j] - used(j))
                counts[i] -= 1
                counts[j] += 1
                moved = True
                break
        if not moved:
            raise ShardPlanError("no assignment of whole KV groups and FFN blocks fits the nodes' memory")
    raise ShardPlanError("memory repair did not converge")
