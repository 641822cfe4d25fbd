"""The tensor-parallel transformer: one rank's layer slices, the master's head, the worker loop.

Per layer (Megatron-LM, Shoeybi et al. 2019, §3; TPI-LLM, Li et al. 2024, §3.1), on every rank::

    a = RMSNorm(h) ; q, k, v = a @ Wq_r.T, a @ Wk_r.T, a @ Wv_r.T      column-parallel, this rank's heads
    q, k = RoPE(q, k) ; KV cache append ; o_r = attention(q, K, V)      this rank's KV groups only
    h = h + all_reduce(o_r @ Wo_r.T)                                     row-parallel partial sums
    b = RMSNorm(h) ; h = h + all_reduce((silu(b @ Wg_r.T) * (b @ Wu_r.T)) @ Wd_r.T)

The all-reduce returns the same bytes on every rank, so every rank keeps an identical residual
stream ``h``; only the master (rank 0) embeds tokens (it broadcasts the embeddings) and applies the
final norm and the head. Numerics follow llama.cpp's CPU path where it matters for token equality:
RMSNorm sums squares in float64 (``ggml_compute_forward_rms_norm_f32``), RoPE "normal" rotates pairs
(2i, 2i+1) and "neox" pairs (i, i + d/2) (``ggml_rope``), and the KV cache is float16 with Q and the
softmax probabilities rounded to float16 before they meet it (llama.cpp's default F16 cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType, quants

from potluck.errors import ProtocolViolation, RequestError, ShardPlanError
from potluck.sharding.collective import Collective
from potluck.sharding.gguf_tensors import ModelConfig
from potluck.sharding.onnx_ops import DEFAULT_ACCURACY_LEVEL, GraphBuilder, Stage, session_options
from potluck.sharding.plan import ShardPlan
from potluck.sharding.shard_file import ShardData

log = logging.getLogger(__name__)

Reduce = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EngineOptions:
    """Runtime knobs of one rank.

    Attributes:
        n_ctx: KV-cache length in tokens.
        threads: ONNX Runtime intra-op threads.
        spinning: let ORT pool threads spin between calls. Off by default: every stage is its own
            session with its own pool, and 66 spinning pools (22 layers x 3 stages) starve the
            running one; measured on the 1.1B bench model, N = 1: 5000 ms/token spinning vs 50 off.
        accuracy_level: ``MatMulNBits`` accuracy level (4: int8 activations, like llama.cpp).
    """

    n_ctx: int = 256
    threads: int = 2
    spinning: bool = False
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL


@dataclass
class RankStats:
    """Seconds spent by one rank: matmuls/attention vs waiting in all-reduce."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    steps: int = 0


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm (Zhang & Sennrich 2019) of float32 ``(T, d)`` rows; sums of squares in float64 as llama.cpp."""
    x64 = x.astype(np.float64)
    mean = np.einsum("ij,ij->i", x64, x64) / x.shape[1]
    scale = (1.0 / np.sqrt(mean + eps)).astype(np.float32)
    return (x * scale[:, None]) * weight


def rope_tables(config: ModelConfig, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin float32 ``(n_ctx, head_dim/2)``: theta_i = p * freq_scale * base^(-2i/d) (Su et al. 2021)."""
    half = config.head_dim // 2
    theta_scale = np.float32(config.rope_theta) ** np.float32(-2.0 / config.head_dim)
    inv = theta_scale.astype(np.float64) ** np.arange(half)
    theta = np.arange(n_ctx, dtype=np.float64)[:, None] * config.rope_freq_scale * inv[None, :]
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: str) -> np.ndarray:
    """Rotate ``x`` float32 ``(T, heads, d)`` with per-position tables ``(T, d/2)``."""
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(x)
    if mode == "normal":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
    else:
        h = x.shape[-1] // 2
        x0, x1 = x[..., :h], x[..., h:]
        out[..., :h] = x0 * c - x1 * s
        out[..., h:] = x0 * s + x1 * c
    return out


@dataclass
class _Layer:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: Stage | None
    o: Stage | None
    ffn: Stage | None
    k_cache: np.ndarray  # (kv_local, n_ctx, hd) float16
    v_cache: np.ndarray


@dataclass
class RankCompute:
    """One rank's slices of every layer, its KV cache, and the layer loop.

    Build with :meth:`from_shard`.
    """

    config: ModelConfig
    plan: ShardPlan
    rank: int
    options: EngineOptions
    layers: list[_Layer]
    cos: np.ndarray
    sin: np.ndarray
    stats: RankStats = field(default_factory=RankStats)

    @classmethod
    def from_shard(cls, shard: ShardData, options: EngineOptions) -> RankCompute:
        """Compile the ORT stages of a shard (its arrays are used in place, no copy).

        Raises:
            ShardPlanError: the shard's metadata is inconsistent.
        """
        meta = shard.meta
        try:
            config = ModelConfig.from_dict(meta["config"])
            plan = ShardPlan.from_dict(meta["plan"])
            rank = int(meta["rank"])
            share = plan.shares[rank]
            linears = meta["linears"]
        except (KeyError, TypeError, IndexError) as exc:
            raise ShardPlanError(f"shard metadata is incomplete: {exc}") from exc
        t = shard.tensors
        hd = config.head_dim
        n_q = share.kv_count * config.group * hd
        layers = []
        for i in range(config.n_layers):
            p = f"blk.{i}."

            qkv = o = ffn = None
            if share.kv_count:
                gb = _builder(options)
                outs = [gb.linear("x", p + n, linears[p + n], t) for n in ("attn_q", "attn_k", "attn_v")]
                qkv = gb.session([("x", config.hidden)], outs, _options(options))
                gb = _builder(options)
                outs = [gb.linear("x", p + "attn_output", linears[p + "attn_output"], t)]
                o = gb.session([("x", n_q)], outs, _options(options))
            if share.ffn_count:
                gb = _builder(options)
                outs = [_ffn_graph(gb, p, linears, t)]
                ffn = gb.session([("x", config.hidden)], outs, _options(options))
            layers.append(
                _Layer(
                    attn_norm=t[p + "attn_norm"],
                    ffn_norm=t[p + "ffn_norm"],
                    qkv=qkv,
                    o=o,
                    ffn=ffn,
                    k_cache=np.zeros((share.kv_count, options.n_ctx, hd), np.float16),
                    v_cache=np.zeros((share.kv_count, options.n_ctx, hd), np.float16),
                )
            )
        cos, sin = rope_tables(config, options.n_ctx)
        return cls(config, plan, rank, options, layers, cos, sin)

    def forward(self, x: np.ndarray, pos: int, reduce: Reduce | None) -> np.ndarray:
        """Run every layer on ``x`` float32 ``(T, hidden)`` at positions ``pos..pos+T-1``.

        Args:
            x: token embeddings (the residual stream's input).
            pos: position of ``x[0]``; the KV cache beyond ``pos`` is overwritten.
            reduce: the all-reduce (``Collective.all_reduce``); ``None`` for a single rank.

        Returns:
            float32 ``(T, hidden)``: the residual stream after the last layer.

        Raises:
            RequestError: ``pos + T`` exceeds the KV cache.
            PeerFailed / TransferError: from ``reduce``.
        """
        c = self.config
        n = x.shape[0]
        if pos < 0 or pos + n > self.options.n_ctx:
            raise RequestError(f"positions {pos}..{pos + n} exceed the context of {self.options.n_ctx} tokens")
        zeros = np.zeros((n, c.hidden), np.float32)
        h = np.ascontiguousarray(x, dtype=np.float32)
        cos, sin = self.cos[pos : pos + n], self.sin[pos : pos + n]
        clock = time.perf_counter
        for layer in self.layers:
            t0 = clock()
            part = zeros
            if layer.qkv is not None and layer.o is not None:
                a = rms_norm(h, layer.attn_norm, c.rms_eps)
                q, k, v = layer.qkv.run(a)
                att = self._attention(layer, q, k, v, pos, cos, sin)
                (part,) = layer.o.run(att)
            t1 = clock()
            h = h + (reduce(part) if reduce else part)
            t2 = clock()
            part = zeros
            if layer.ffn is not None:
                (part,) = layer.ffn.run(rms_norm(h, layer.ffn_norm, c.rms_eps))
            t3 = clock()
            h = h + (reduce(part) if reduce else part)
            t4 = clock()
            self.stats.compute_s += (t1 - t0) + (t3 - t2)
            self.stats.comm_s += (t2 - t1) + (t4 - t3)
        self.stats.steps += 1
        return h

    def _attention(
        self,
        layer: _Layer,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        pos: int,
        cos: np.ndarray,
        sin: np.ndarray,
    ) -> np.ndarray:
        """Causal GQA attention of this rank's heads; returns float32 ``(T, heads_local * hd)``."""
        c = self.config
        n, hd, g = q.shape[0], c.head_dim, c.group
        kv = layer.k_cache.shape[0]
        q = apply_rope(q.reshape(n, kv * g, hd), cos, sin, c.rope_mode)  # (T, nh, hd)
        k = apply_rope(k.reshape(n, kv, hd), cos, sin, c.rope_mode)  # (T, nkv, hd)
        layer.k_cache[:, pos : pos + n] = k.transpose(1, 0, 2)
        layer.v_cache[:, pos : pos + n] = v.reshape(n, kv, hd).transpose(1, 0, 2)
        s = pos + n
        keys = layer.k_cache[:, :s].astype(np.float32)  # (nkv, S, hd)
        vals = layer.v_cache[:, :s].astype(np.float32)
        # (nkv, G*T, hd): query heads grouped under their KV head, rounded like llama.cpp's F16 cache path
        qg = q.reshape(n, kv, g, hd).transpose(1, 2, 0, 3).reshape(kv, g * n, hd)
        qg = qg.astype(np.float16).astype(np.float32)
        scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(hd))  # (nkv, G*T, S)
        if n > 1:
            causal = np.arange(s)[None, :] > (pos + np.arange(n))[:, None]  # (T, S)
            scores = scores.reshape(kv, g, n, s)
            scores[:, :, causal] = -np.inf
            scores = scores.reshape(kv, g * n, s)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        probs = probs.astype(np.float16).astype(np.float32)
        out = probs @ vals  # (nkv, G*T, hd)
        return np.ascontiguousarray(out.reshape(kv, g, n, hd).transpose(2, 0, 1, 3).reshape(n, kv * g * hd))


def _builder(options: EngineOptions) -> GraphBuilder:
    return GraphBuilder(accuracy_level=options.accuracy_level)


def _options(options: EngineOptions):
    return session_options(options.threads, options.spinning)


def _ffn_graph(gb: GraphBuilder, p: str, linears: dict, t: dict[str, np.ndarray]) -> str:
    """SwiGLU (Shazeer 2020): ``down(silu(gate(x)) * up(x))``; returns the output name."""
    from onnx import helper

    gate = gb.linear("x", p + "ffn_gate", linears[p + "ffn_gate"], t)
    up = gb.linear("x", p + "ffn_up", linears[p + "ffn_up"], t)
    gb.nodes.append(helper.make_node("Sigmoid", [gate], ["sig"]))
    gb.nodes.append(helper.make_node("Mul", [gate, "sig"], ["silu"]))
    gb.nodes.append(helper.make_node("Mul", ["silu", up], ["act"]))
    return gb.linear("act", p + "ffn_down", linears[p + "ffn_down"], t)


class TPMaster:
    """Rank 0: embeds tokens, drives the workers, applies the final norm and head.

    Args:
        compute: rank 0's layer slices.
        shard: rank 0's shard (needs ``token_embd.raw``, ``output_norm``, ``output.*``).
        collective: the star group, or ``None`` for a single rank.
    """

    def __init__(self, compute: RankCompute, shard: ShardData, collective: Collective | None) -> None:
        if compute.rank != 0:
            raise ShardPlanError("TPMaster needs rank 0's shard")
        self.compute = compute
        self.config = compute.config
        self.collective = collective
        self.cached_ids: list[int] = []  # tokens whose K/V the group holds at positions 0..n-1
        t = shard.tensors
        emb = shard.meta["embedding"]
        self._embd = t["token_embd.raw"]
        self._embd_type = GGMLQuantizationType(int(emb["qtype"]))
        self._out_norm = t["output_norm"]
        gb = GraphBuilder(accuracy_level=compute.options.accuracy_level)
        out = gb.linear("x", "output", shard.meta["linears"]["output"], t)
        self._head = gb.session(
            [("x", self.config.hidden)],
            [out],
            session_options(compute.options.threads, compute.options.spinning),
        )

    @property
    def n_ctx(self) -> int:
        return self.compute.options.n_ctx

    @property
    def world_size(self) -> int:
        return self.collective.world_size if self.collective else 1

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token embeddings float32 ``(T, hidden)``."""
        rows = self._embd[np.asarray(ids, dtype=np.int64)]
        if self._embd_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return rows.astype(np.float32)
        return quants.dequantize(rows, self._embd_type).astype(np.float32).reshape(len(ids), self.config.hidden)

    def forward(self, ids: list[int], pos: int, all_logits: bool = False) -> np.ndarray:
        """Logits float32 ``(T, vocab)`` (``all_logits``) or ``(1, vocab)`` for the last token.

        Raises:
            RequestError: bad token ids or context overflow.
            PeerFailed: a worker failed (the caller re-plans).
        """
        if not ids:
            raise RequestError("forward needs at least one token")
        if min(ids) < 0 or max(ids) >= self.config.vocab:
            raise RequestError("token id out of range")
        if pos + len(ids) > self.n_ctx:
            raise RequestError(f"{pos + len(ids)} tokens exceed the context of {self.n_ctx}")
        x = self.embed(ids)
        if self.collective is not None:
            self.collective.broadcast({"op": "forward", "pos": pos, "n": len(ids)}, x)
        reduce = self.collective.all_reduce if self.collective is not None else None
        h = self.compute.forward(x, pos, reduce)
        if not all_logits:
            h = h[-1:]
        t0 = time.perf_counter()
        (logits,) = self._head.run(rms_norm(h, self._out_norm, self.config.rms_eps))
        self.compute.stats.compute_s += time.perf_counter() - t0
        return logits

    def gather_stats(self) -> list[RankStats]:
        """Every rank's :class:`RankStats` (one extra all-reduce)."""
        own = self.compute.stats
        if self.collective is None:
            return [own]
        self.collective.broadcast({"op": "stats"})
        vec = np.zeros((self.world_size, 3), np.float32)
        vec[0] = (own.compute_s, own.comm_s, own.steps)
        total = self.collective.all_reduce(vec)
        return [RankStats(float(a), float(b), int(c)) for a, b, c in total]

    def reset_stats(self) -> None:
        if self.collective is not None:
            self.collective.broadcast({"op": "reset_stats"})
        self.compute.stats = RankStats()

    def shutdown(self) -> None:
        """Tell the workers to exit their loop (best effort) and close the collective."""
        if self.collective is None:
            return
        try:
            self.collective.broadcast({"op": "stop"})
        finally:
            self.collective.close()


def serve_worker(collective: Collective, compute: RankCompute) -> None:
    """A worker's loop: run what the master broadcasts until it says ``stop``.

    Raises:
        ProtocolViolation: an unknown op or a malformed forward (shape, dtype, positions).
        TransferError / ClosedError: the master went away.
    """
    hidden = compute.config.hidden
    while True:
        header, array = collective.receive()
        op = header.get("op")
        if op == "forward":
            pos, n = header.get("pos"), header.get("n")
            if (
                not isinstance(pos, int)
                or not isinstance(n, int)
                or array is None
                or array.dtype != np.float32
                or array.shape != (n, hidden)
            ):
                raise ProtocolViolation(f"malformed forward header {header!r}")
            compute.forward(array, pos, collective.all_reduce)
        elif op == "stats":
            vec = np.zeros((collective.world_size, 3), np.float32)
            s = compute.stats
            vec[collective.rank] = (s.compute_s, s.comm_s, s.steps)
            collective.all_reduce(vec)
        elif op == "reset_stats":
            compute.stats = RankStats()
        elif op == "stop":
            log.info("rank %d: master said stop", collective.rank)
            return
        else:
            raise ProtocolViolation(f"unknown op {op!r}")
