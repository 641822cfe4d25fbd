"""The tensor-parallel cost model: predicted milliseconds per decoded token for a group.

Decoding one token reads every rank's weights once and runs two star all-reduces per layer
(after attention and after the FFN; TPI-LLM, Li et al. 2024, §3.3, whose analysis this follows),
plus one more exchange per token: the master broadcasts the token's embedding and gathers the
vocab-parallel head's logits slices. Ranks work in parallel and meet at every exchange, so a token
costs the slowest rank's weight streaming plus the exchanges' latency chain::

    s/token = max over ranks (resident_bytes / memory_bw + streamed_bytes / disk_bw)
            + 2 * layers * (rtt + overhead + 2 * hidden * 4 / link_bw)      all-reduces
            + (rtt + overhead + (hidden + vocab / N) * 4 / link_bw)         broadcast + gather

``streamed_bytes`` are the weights of the layers outside a rank's window (read again every token,
:mod:`potluck.sharding.compute.residency`); with prefetching they overlap compute, so the
weight term is a floor, not a sum. An all-reduce moves one ``hidden``-wide float32 row each way.
``overhead`` is what one exchange costs beyond the wire (serialization, syscalls, waking the
waiting rank, the per-layer program launches between exchanges): measured at zero added delay
(``bench/tp_netem.py``: 50-90 us per exchange with two ranks on this project's 2-core test machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from potluck.sharding.format.plan import ShardPlan

#: Resident bytes of a quantized weight per byte in the GGUF once ONNX Runtime has prepacked it:
#: MLAS's level-4 4-bit block is 24 bytes (16 of nibbles, a float32 scale, a float32 block sum)
#: where Q4_0 stores 18. The estimate behind every "does it fit" before a rank has compiled.
PREPACK_GROWTH = 4 / 3


@dataclass(frozen=True)
class RankCost:
    """One rank's per-token weight traffic and the device's measured bandwidths.

    Attributes:
        resident_bytes: weight bytes read per token from memory.
        streamed_bytes: weight bytes read per token from disk (layers outside the window).
        memory_bw: bytes/s the device streams resident weights at (measured matmul throughput).
        disk_bw: bytes/s it reads its spill files at (measured sequential read, cache dropped).
    """

    resident_bytes: float
    streamed_bytes: float
    memory_bw: float
    disk_bw: float

    @property
    def weight_s(self) -> float:
        """Seconds per token this rank spends reading weights (the streaming floor)."""
        disk = self.streamed_bytes / self.disk_bw if self.streamed_bytes else 0.0
        return self.resident_bytes / self.memory_bw + disk


#: Seconds one exchange over the star costs beyond the wire when nothing better is known
#: (:attr:`LinkCost.overhead_s`; measured on this project's test machine, module docstring).
DEFAULT_EXCHANGE_OVERHEAD_S = 1e-4


@dataclass(frozen=True)
class LinkCost:
    """The star's links, as the slowest member sees them: round trip (s), bandwidth (bytes/s), and
    the software cost of one exchange beyond the wire (s; see the module docstring)."""

    rtt_s: float
    bandwidth: float
    overhead_s: float = 0.0


def allreduce_s(hidden: int, link: LinkCost, tokens: int = 1) -> float:
    """Seconds of one star all-reduce of ``tokens`` float32 rows of ``hidden``: a round trip and
    the exchange's overhead, plus the row's bytes up and the sum's bytes down."""
    return link.rtt_s + link.overhead_s + 2 * tokens * hidden * 4 / link.bandwidth


def token_exchange_s(hidden: int, vocab: int, ranks: int, link: LinkCost) -> float:
    """Seconds of a token's broadcast (its float32 embedding, ``hidden`` wide) and gather (each
    worker's ``vocab / ranks`` float32 logits): one round trip and overhead, plus the bytes."""
    return link.rtt_s + link.overhead_s + (hidden + vocab / ranks) * 4 / link.bandwidth


def predict_s_per_token(
    ranks: Sequence[RankCost], layers: int, hidden: int, link: LinkCost | None, vocab: int = 0
) -> float:
    """Predicted seconds per decoded token (see the module docstring).

    Args:
        ranks: every rank's weight traffic (a single rank: no exchange).
        layers: transformer layers.
        hidden: model width (the all-reduced row).
        link: the star's links (``None`` for a single rank).
        vocab: vocabulary size (the gathered logits; 0 leaves their bytes out).
    """
    weights = max(r.weight_s for r in ranks)
    if len(ranks) == 1 or link is None:
        return weights
    return weights + 2 * layers * allreduce_s(hidden, link) + token_exchange_s(hidden, vocab, len(ranks), link)


#: Assumed when a device or link has not been measured (a peer that advertises 0): a laptop's
#: weight-streaming and SSD bandwidth, and a LAN round trip. Bytes/s, bytes/s, seconds.
DEFAULT_MEMORY_BW = 10e9
DEFAULT_DISK_BW = 0.5e9
DEFAULT_RTT_S = 0.01


@dataclass(frozen=True)
class RankSizing:
    """How one rank's share sits in its memory budget.

    Attributes:
        weights: its layer weights once prepacked (estimate), bytes.
        fixed: what stays resident besides them (KV cache; on the master also the output head), bytes.
        layers: transformer layers.
        window: layers it keeps resident (``layers``: all of them; 0: not even one fits the budget).
    """

    weights: float
    fixed: float
    layers: int
    window: int

    @property
    def per_layer(self) -> float:
        return self.weights / max(1, self.layers)

    @property
    def streamed(self) -> float:
        """Weight bytes it reads from disk per token (the layers outside its window)."""
        return (self.layers - self.window) * self.per_layer

    @property
    def needed(self) -> float:
        """The smallest budget that holds a window of one layer, bytes."""
        return self.fixed + self.per_layer

    def cost(self, memory_bw: float, disk_bw: float) -> RankCost:
        """Its per-token weight traffic on a device with these bandwidths (bytes/s)."""
        return RankCost(self.window * self.per_layer + self.fixed, self.streamed, memory_bw, disk_bw)


def size_rank(weights: float, fixed: float, layers: int, budget: int) -> RankSizing:
    """The window of a rank with ``weights`` prepacked layer bytes and ``fixed`` resident bytes
    under ``budget`` bytes (0: no limit), as :mod:`potluck.sharding.compute.residency` keeps it."""
    if budget <= 0 or weights + fixed <= budget:
        return RankSizing(weights, fixed, layers, layers)
    per_layer = max(weights, 1.0) / max(1, layers)
    window = int(min(layers, max(0.0, (budget - fixed) // per_layer)))
    return RankSizing(weights, fixed, layers, window)


def rank_sizing(plan: ShardPlan, rank: int, budget: int, master_extra: int = 0) -> RankSizing:
    """:func:`size_rank` for rank ``rank`` of ``plan`` under ``budget`` bytes: its layers are its
    share's planned bytes less its KV cache and head slice, prepacked; the KV cache and its slice of
    the output head stay resident.

    Args:
        master_extra: rank 0's planned bytes beyond its layers and head slice (the token embeddings,
            memory-mapped, :attr:`~potluck.sharding.format.plan.PlanGeometry.master_bytes`); 0 for a worker.
    """
    cache, head = plan.kv_cache_bytes(rank), plan.head_bytes(rank)
    weights = max(0, plan.shares[rank].est_bytes - cache - head - master_extra) * PREPACK_GROWTH
    return size_rank(weights, cache + head * PREPACK_GROWTH, plan.n_layers, budget)
