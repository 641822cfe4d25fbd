"""The tensor-parallel transformer: one rank's layer slices and head rows, the master, the worker loop.

Per layer (Megatron-LM, Shoeybi et al. 2019, §3; TPI-LLM, Li et al. 2024, §3.1), on every rank::

    a = RMSNorm(h) ; q, k, v = a @ Wq_r.T, a @ Wk_r.T, a @ Wv_r.T      column-parallel, this rank's heads
    q, k = RoPE(q, k) ; KV cache append ; o_r = attention(q, K, V)      this rank's KV groups only
    h = h + all_reduce(o_r @ Wo_r.T)                                     row-parallel partial sums
    b = RMSNorm(h) ; h = h + all_reduce((silu(b @ Wg_r.T) * (b @ Wu_r.T)) @ Wd_r.T)

The all-reduce returns the same bytes on every rank, so every rank keeps an identical residual
stream ``h``; only the master (rank 0) embeds tokens (it broadcasts the embeddings). The head is
vocab-parallel: every rank applies the final norm and its rows of the output head to ``h`` and the
master gathers the logits slices (:meth:`Collective.gather`). Numerics follow llama.cpp's CPU path
where it matters for token equality: RMSNorm is ORT's fused SimplifiedLayerNormalization (llama.cpp
sums squares in float64; see :func:`potluck.sharding.compute.blocks.rms_norm` for why that costs no
fidelity), RoPE "normal" rotates pairs (2i, 2i+1) and "neox" pairs (i, i + d/2) (``ggml_rope``), and
the KV cache is float16 with Q and the softmax probabilities rounded to float16 before they meet it
(llama.cpp's default F16 cache). ``EngineOptions.attention = "fused"`` trades that for ORT's fused
``GroupQueryAttention`` kernel (faster, same perplexity, greedy answers less often llama.cpp's).

Execution: the blocks are ONNX subgraphs (:mod:`potluck.sharding.compute.blocks`) run by ONNX Runtime through
IO binding, the KV cache rows written in place. With N = 1 the whole model and the head are one
graph, one ``run`` per forward pass (on the 1.1B bench model this took decode from 45 to 35 ms/token
against 66 stage sessions plus numpy norms/RoPE/attention). With N > 1 each layer is two graphs cut
at the all-reduce points. A rank over its memory budget also runs layer by layer, its layer programs
memory-mapped from disk through a sliding window (:mod:`potluck.sharding.compute.residency`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
from gguf import GGMLQuantizationType, quants

from potluck.errors import ProtocolViolation, RequestError, ShardPlanError
from potluck.sharding.collective.base import Collective
from potluck.sharding.compute import blocks
from potluck.sharding.compute.onnx_ops import DEFAULT_ACCURACY_LEVEL, GraphBuilder, Program, session_options
from potluck.sharding.compute.residency import LayerWindow
from potluck.sharding.format.cost import PREPACK_GROWTH
from potluck.sharding.format.gguf_tensors import ModelConfig
from potluck.sharding.format.pages import release_array, release_file, trim_heap
from potluck.sharding.format.plan import ShardPlan
from potluck.sharding.format.shard_file import ShardData, read_shard, write_shard

log = logging.getLogger(__name__)

Reduce = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EngineOptions:
    """Runtime knobs of one rank.

    Attributes:
        n_ctx: KV-cache length in tokens.
        threads: ONNX Runtime intra-op threads.
        spinning: let ORT pool threads spin between calls. ``None`` (default): only where the rank
            is one program (N = 1, not windowed), which owns the process's cores (1.1B bench model:
            22.3 -> 21.2 ms/token). With N > 1 every segment is its own session with its own pool,
            and 44-66 spinning pools starve the running one (measured on the 1.1B bench model with
            66 stages: 5000 ms/token spinning vs 50 off).
        accuracy_level: ``MatMulNBits`` accuracy level (4: int8 activations, like llama.cpp).
        attention: ``"exact"`` (default): llama.cpp's F16-cache attention bit for bit
            (:func:`~potluck.sharding.compute.blocks.attention`, about 25 kernels a layer);
            ``"fused"``: one float16 ``GroupQueryAttention`` kernel
            (:func:`~potluck.sharding.compute.blocks.fused_attention`), 1-2.5 ms/token faster on the
            1.1B bench model at the same perplexity, but its rounding moves greedy answers further
            from llama.cpp's (SmolLM2 Q4_1 chat: median first divergence 17.5 of 32 tokens against
            25.5 exact; ``bench/tp_chat.py``), so it is opt-in.
        memory_budget: bytes this rank's model state may keep resident (layer weights, KV cache,
            the master's head); 0: no limit. A rank whose slices do not fit keeps a sliding window
            of layers (:mod:`potluck.sharding.compute.residency`).
        spill_dir: where a windowed rank writes its per-layer programs (required with a budget).
        drop_cache: a windowed rank also drops released layers from the page cache (the next
            token reads them from disk, as for a model larger than RAM; for measurements).
    """

    n_ctx: int = 256
    threads: int = 2
    spinning: bool | None = None
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    attention: str = "exact"
    memory_budget: int = 0
    spill_dir: Path | None = None
    drop_cache: bool = False


@dataclass
class RankStats:
    """Seconds spent by one rank: matmuls/attention vs waiting in all-reduce."""

    compute_s: float = 0.0
    comm_s: float = 0.0
    steps: int = 0
    io_s: float = 0.0  #: windowed ranks: time stalled waiting for a layer's weights
    window: int = 0  #: layers resident at once (0: all of them)
    layer_mib: float = 0.0  #: windowed ranks: the largest layer's mapped weights, MiB

    def row(self) -> tuple[float, ...]:
        """The stats as one float row (for the all-reduce that gathers them)."""
        return (self.compute_s, self.comm_s, self.steps, self.io_s, self.window, self.layer_mib)

    @classmethod
    def from_row(cls, row: np.ndarray) -> RankStats:
        a, b, c, d, e, f = (float(x) for x in row)
        return cls(a, b, int(c), d, int(e), f)


def rope_tables(config: ModelConfig, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin float32 ``(n_ctx, head_dim/2)``: theta_i = p * freq_scale * base^(-2i/d) (Su et al. 2021)."""
    half = config.head_dim // 2
    theta_scale = np.float32(config.rope_theta) ** np.float32(-2.0 / config.head_dim)
    inv = theta_scale.astype(np.float64) ** np.arange(half)
    theta = np.arange(n_ctx, dtype=np.float64)[:, None] * config.rope_freq_scale * inv[None, :]
    return np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)


def causal_mask(pos: int, n: int, window: int = 0) -> np.ndarray:
    """Additive mask float32 ``(n, pos + n)``: 0 where new token ``t`` may attend, ``-inf`` after it
    and, with a sliding ``window``, at ``window`` or more positions before it (llama.cpp's standard
    SWA: position ``p0`` is masked for ``p1`` when ``p1 - p0 >= window``)."""
    mask = np.zeros((n, pos + n), np.float32)
    keys = np.arange(pos + n)[None, :]
    queries = (pos + np.arange(n))[:, None]
    if n > 1:
        mask[keys > queries] = -np.inf
    if window:
        mask[queries - keys >= window] = -np.inf
    return mask


def attention_inputs(config: ModelConfig, pos: int, n: int, fused: bool = False) -> dict[str, np.ndarray]:
    """``pos_ids``, ``mask`` (and ``mask_local`` for sliding-window models) of a forward pass; with
    ``fused`` attention, ``seqlens_k`` and ``total_len`` (:func:`~potluck.sharding.compute.blocks.declare_inputs`)."""
    if fused:
        return {
            blocks.SEQLENS_K: np.array([pos + n - 1], np.int32),
            blocks.TOTAL_LEN: np.array(pos + n, np.int32),
        }
    inputs = {"pos_ids": np.arange(pos, pos + n, dtype=np.int64)[None], "mask": causal_mask(pos, n)}
    if config.sliding_window:
        inputs["mask_local"] = causal_mask(pos, n, config.sliding_window)
    return inputs


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm float32 ``(T, d)`` in numpy (as ggml: the mean of squares in float64): the post-norms,
    which act on the all-reduced sum and so cannot live in a rank's graph."""
    mean = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
    scale = (1.0 / np.sqrt(mean + eps)).astype(np.float32)
    return (x * scale) * weight


@dataclass
class _StepBuffers:
    """The arrays one forward pass of ``T`` tokens binds into a rank's programs besides the KV cache:
    reused step after step for ``T = 1``, so that :meth:`Program.run` finds them bound already."""

    h: np.ndarray  #: float32 ``(T, hidden)``: the residual stream, updated in place
    partial: np.ndarray  #: float32 ``(T, hidden)``: a program's partial sum (the all-reduce copies it)
    zeros: np.ndarray  #: float32 ``(T, hidden)``: the partial sum of a rank without heads/columns
    fused: dict[str, np.ndarray] = field(default_factory=dict)  #: fused attention's position inputs

    @classmethod
    def of(cls, n: int, hidden: int) -> _StepBuffers:
        h, partial, zeros = (np.zeros((n, hidden), np.float32) for _ in range(3))
        return cls(h, partial, zeros)

    def attention_inputs(self, config: ModelConfig, pos: int, n: int, fused: bool) -> dict[str, np.ndarray]:
        """:func:`attention_inputs`; fused attention's are written into the same two arrays every step."""
        if not fused:
            return attention_inputs(config, pos, n)
        if not self.fused:
            self.fused = attention_inputs(config, pos, n, fused=True)
        else:
            self.fused[blocks.SEQLENS_K][0] = pos + n - 1
            self.fused[blocks.TOTAL_LEN][()] = pos + n
        return self.fused


@dataclass
class _Layer:
    attn: Program | None  # N > 1: RMSNorm .. o_proj partial sum; None without KV heads or for N = 1
    ffn: Program | None  # N > 1: RMSNorm .. down partial sum; None without FFN columns or for N = 1
    k_cache: np.ndarray  # float16, exact attention: (n_ctx, kv_local, hd); fused: (1, kv_local, n_ctx, hd)
    v_cache: np.ndarray


@dataclass
class RankCompute:
    """One rank's slices of every layer, its KV cache, and the layer loop.

    With one rank (N = 1) the whole model, head included, is one ONNX graph (:attr:`stack`) run once
    per forward pass. With N > 1 each layer is two graphs cut at the all-reduce points (attention
    up to the o_proj partial sum, FFN up to the down-proj partial sum); the residual adds are numpy.
    A rank whose slices exceed ``options.memory_budget`` runs layer by layer at any N, with a
    :attr:`window`. Build with :meth:`from_shard`; :meth:`close` stops the window's thread.
    """

    config: ModelConfig
    plan: ShardPlan
    rank: int
    options: EngineOptions
    layers: list[_Layer]
    stack: Program | None = None
    stack_logits: str = ""
    stats: RankStats = field(default_factory=RankStats)
    #: N > 1, models with post-norms: per layer (post_attention_norm, post_ffw_norm) float32 ``(hidden,)``
    post_norms: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    #: the sliding window over the layers, when the slices exceed ``options.memory_budget``
    window: LayerWindow | None = None
    #: N > 1 (or windowed): final norm and this rank's rows of the output head; None without vocab rows
    head: Program | None = None
    head_out: str = ""
    #: attention through :func:`~potluck.sharding.compute.blocks.fused_attention` (see ``EngineOptions.attention``)
    fused: bool = False
    #: N > 1: the decode step's buffers (``T = 1``), the same every step so the programs keep their bindings
    _buffers: dict[int, _StepBuffers] = field(default_factory=dict)

    @classmethod
    def from_shard(cls, shard: ShardData, options: EngineOptions) -> RankCompute:
        """Compile the ORT programs of a shard (its arrays are used in place, no copy).

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
        hd, kv = config.head_dim, share.kv_count
        fused = _fused_attention(options)
        attend = blocks.fused_attention if fused else blocks.attention
        tables = {"": rope_tables(config, options.n_ctx)}
        if config.sliding_window:
            tables["local."] = rope_tables(
                replace(config, rope_theta=config.rope_theta_local, rope_freq_scale=1.0), options.n_ctx
            )
        if fused:  # GroupQueryAttention's tables have the cache's dtype
            tables = {k: (cos.astype(np.float16), sin.astype(np.float16)) for k, (cos, sin) in tables.items()}

        def rope(gb: GraphBuilder, layer: int) -> tuple[str, str]:
            key = "local." if config.is_local(layer) else ""
            names = f"rope.{key}cos", f"rope.{key}sin"
            if names[0] not in gb.arrays:  # once per graph
                for name, table in zip(names, tables[key], strict=True):
                    gb.constant(name, table)
            return names

        cache_shape = (1, kv, options.n_ctx, hd) if fused else (options.n_ctx, kv, hd)
        layers = [
            _Layer(None, None, np.zeros(cache_shape, np.float16), np.zeros(cache_shape, np.float16))
            for _ in range(config.n_layers)
        ]
        spill: Path | None = None
        if _needs_window(shard, config, options, kv):
            assert options.spill_dir is not None
            spill = options.spill_dir / f"{plan.plan_id}-r{rank}"  # ranks may share a spill directory
            spill.mkdir(parents=True, exist_ok=True)
            shard = _file_backed(shard, spill)
            t = shard.tensors
        windowed = spill is not None
        if plan.world_size == 1 and not windowed:
            if "output" not in linears:
                raise ShardPlanError("a single-rank shard must hold the head")
            gb = _builder(options)
            blocks.declare_inputs(gb, config, fused=fused)
            h = "x"
            for i in range(config.n_layers):
                attn = attend(gb, i, h, config, kv, linears, t, rope(gb, i))
                h = gb.node("Add", [h, blocks.post_norm(gb, attn, i, "post_attention_norm", config, t)], f"l{i}.h_attn")
                ffn = blocks.ffn(gb, i, h, config, linears, t)
                h = gb.node("Add", [h, blocks.post_norm(gb, ffn, i, "post_ffw_norm", config, t)], f"l{i}.h_ffn")
            gb.add_input("rows", np.int64, ["R"])
            logits = blocks.head(gb, h, "rows", config, linears, t)
            outputs = [(logits, np.float32), *_cache_outputs(config.n_layers, fused=fused)]
            stack = gb.program(outputs, _options(options, owns_cores=True))
            if shard.path is not None:  # compiled: ORT holds its own (prepacked) copies of the weights
                release_file(shard.path)
            return cls(config, plan, rank, options, layers, stack, logits, fused=fused)

        def compile_layer(gb: GraphBuilder, outputs: list[tuple[str, type]], name: str) -> Program:
            if spill is None:
                return gb.program(outputs, _options(options))
            return gb.program_on_disk(outputs, _options(options), spill / name, _options(options))

        def drop_layer(i: int) -> None:
            # Compiled: ORT holds its own (prepacked) copy, so the layer's shard pages can go now
            # rather than after the last layer (they are clean file pages: read back if touched).
            for name, arr in t.items():
                if name.startswith(f"blk.{i}."):
                    release_array(arr)
            if spill is not None:  # windowed: ORT's copy is on disk too, and the pages it touched
                for part in ("attn", "ffn"):  # loading the programs back can go as well
                    if (spill / f"l{i}.{part}.data").exists():
                        release_file(spill / f"l{i}.{part}.data")
                trim_heap()

        for i, layer in enumerate(layers):
            if kv:
                gb = _builder(options)
                blocks.declare_inputs(gb, config, fused=fused)
                part = gb.node("Identity", [attend(gb, i, "x", config, kv, linears, t, rope(gb, i))], "partial")
                outputs = [(part, np.float32), *_cache_outputs(1, first=i, fused=fused)]
                layer.attn = compile_layer(gb, outputs, f"l{i}.attn")
            if share.ffn_count:
                gb = _builder(options)
                blocks.declare_inputs(gb, config, attention=False)
                part = gb.node("Identity", [blocks.ffn(gb, i, "x", config, linears, t)], "partial")
                layer.ffn = compile_layer(gb, [(part, np.float32)], f"l{i}.ffn")
            drop_layer(i)
        post = (
            [(t[f"blk.{i}.post_attention_norm"], t[f"blk.{i}.post_ffw_norm"]) for i in range(config.n_layers)]
            if config.post_norms
            else []
        )
        window = None
        if spill is not None:
            trim_heap()
            files = [[spill / f"l{i}.{part}.data" for part in ("attn", "ffn")] for i in range(config.n_layers)]
            files = [[f for f in fs if f.exists()] for fs in files]
            fixed = _fixed_bytes(shard, options, kv)
            window = LayerWindow.within(files, options.memory_budget, fixed, options.drop_cache)
            log.info(
                "rank %d: %d of %d layers resident at once (%.1f MiB each, budget %.0f MiB)",
                rank, window.window, config.n_layers, max(window.layer_bytes) / 2**20, options.memory_budget / 2**20,
            )  # fmt: skip
        head, head_out = None, ""
        if "output" in linears:  # this rank's slice of the vocab-parallel head (resident, not windowed)
            gb = _builder(options)
            gb.add_input("x", np.float32, ["T", config.hidden])
            gb.add_input("rows", np.int64, ["R"])
            head_out = blocks.head(gb, "x", "rows", config, linears, t)
            head = gb.program([(head_out, np.float32)], _options(options))
        if shard.path is not None:  # compiled: ORT holds its own (prepacked) copies of the weights
            release_file(shard.path)
        return cls(
            config,
            plan,
            rank,
            options,
            layers,
            post_norms=post,
            window=window,
            head=head,
            head_out=head_out,
            fused=fused,
        )

    def head_logits(self, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Logits of this rank's vocabulary rows for rows ``rows`` (int64 ``(R,)``) of the residual
        stream ``h`` float32 ``(T, hidden)``: float32 ``(R, vocab_count)`` (``(R, 0)`` without any)."""
        share = self.plan.shares[self.rank]
        logits = np.empty((len(rows), share.vocab_count), np.float32)
        if self.head is not None and len(rows):
            t0 = time.perf_counter()
            self.head.run({"x": h, "rows": rows}, {self.head_out: logits})
            self.stats.compute_s += time.perf_counter() - t0
        return logits

    def stats_now(self) -> RankStats:
        """:attr:`stats` with the window's size filled in."""
        w = self.window
        if w is not None:
            self.stats.window, self.stats.layer_mib = w.window, max(w.layer_bytes) / 2**20
        return self.stats

    def close(self) -> None:
        """Stop the layer window's prefetch thread, if any (idempotent)."""
        if self.window is not None:
            self.window.close()

    def _check(self, n: int, pos: int) -> None:
        if pos < 0 or pos + n > self.options.n_ctx:
            raise RequestError(f"positions {pos}..{pos + n} exceed the context of {self.options.n_ctx} tokens")

    def _cache_io(self, i: int, pos: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Layer ``i``'s cache bindings: inputs rows ``[0, pos)``, outputs rows ``[pos, pos + n)`` (in place;
        fused attention binds the whole cache as input and output, and ORT writes those rows)."""
        layer = self.layers[i]
        if self.fused:
            return (
                {f"{i}.past_k": layer.k_cache, f"{i}.past_v": layer.v_cache},
                {f"{i}.present_k": layer.k_cache, f"{i}.present_v": layer.v_cache},
            )
        past = {f"{i}.past_k": layer.k_cache[:pos], f"{i}.past_v": layer.v_cache[:pos]}
        new = {f"{i}.new_k": layer.k_cache[pos : pos + n], f"{i}.new_v": layer.v_cache[pos : pos + n]}
        return past, new

    def forward_logits(self, x: np.ndarray, pos: int, rows: np.ndarray) -> np.ndarray:
        """N = 1: the whole model on ``x`` float32 ``(T, hidden)`` at positions ``pos..pos+T-1``.

        Args:
            x: token embeddings.
            pos: position of ``x[0]``; the KV cache beyond ``pos`` is overwritten.
            rows: int64 ``(R,)`` rows of ``x`` whose logits are wanted.

        Returns:
            float32 ``(R, vocab)`` logits.

        Raises:
            RequestError: ``pos + T`` exceeds the KV cache.
        """
        if self.stack is None:
            raise ShardPlanError("forward_logits needs a single-rank shard")
        n = x.shape[0]
        self._check(n, pos)
        t0 = time.perf_counter()
        inputs = {
            "x": np.ascontiguousarray(x, dtype=np.float32),
            **attention_inputs(self.config, pos, n, self.fused),
            "rows": np.ascontiguousarray(rows, dtype=np.int64),
        }
        logits = np.empty((len(rows), self.config.vocab), np.float32)
        outputs = {self.stack_logits: logits}
        for i in range(self.config.n_layers):
            past, new = self._cache_io(i, pos, n)
            inputs.update(past)
            outputs.update(new)
        self.stack.run(inputs, outputs)
        self.stats.compute_s += time.perf_counter() - t0
        self.stats.steps += 1
        return logits

    def forward(self, x: np.ndarray, pos: int, reduce: Reduce | None) -> np.ndarray:
        """N > 1: run every layer on ``x`` float32 ``(T, hidden)`` at positions ``pos..pos+T-1``.

        Args:
            x: token embeddings (the residual stream's input).
            pos: position of ``x[0]``; the KV cache beyond ``pos`` is overwritten.
            reduce: the all-reduce (``Collective.all_reduce``); ``None`` for a single rank.

        Returns:
            float32 ``(T, hidden)``: the residual stream after the last layer.

        Raises:
            RequestError: ``pos + T`` exceeds the KV cache.
            ShardPlanError: a single-rank shard (use :meth:`forward_logits`).
            PeerFailed / TransferError: from ``reduce``.
        """
        if self.stack is not None:
            raise ShardPlanError("a single-rank shard runs forward_logits")
        c = self.config
        n = x.shape[0]
        self._check(n, pos)
        buf = self._buffers.get(n) or _StepBuffers.of(n, c.hidden)
        if n == 1:
            self._buffers[1] = buf
        zeros, h = buf.zeros, buf.h
        np.copyto(h, x)
        attn_in = buf.attention_inputs(c, pos, n, self.fused)
        post = self.post_norms
        clock = time.perf_counter
        window = self.window
        for i, layer in enumerate(self.layers):
            if window is not None:
                t_io = clock()
                window.enter(i)
                self.stats.io_s += clock() - t_io
            t0 = clock()
            part = zeros
            if layer.attn is not None:
                part = buf.partial
                past, new = self._cache_io(i, pos, n)
                layer.attn.run({"x": h, **attn_in, **past}, {"partial": part, **new})
            t1 = clock()
            out = reduce(part) if reduce else part
            np.add(h, rms_norm(out, post[i][0], c.rms_eps) if post else out, out=h)
            t2 = clock()
            part = zeros
            if layer.ffn is not None:
                part = buf.partial
                layer.ffn.run({"x": h}, {"partial": part})
            t3 = clock()
            out = reduce(part) if reduce else part
            np.add(h, rms_norm(out, post[i][1], c.rms_eps) if post else out, out=h)
            t4 = clock()
            self.stats.compute_s += (t1 - t0) + (t3 - t2)
            self.stats.comm_s += (t2 - t1) + (t4 - t3)
            if window is not None:
                window.leave(i)
        self.stats.steps += 1
        return h.copy()  # the buffer is the next step's


def _fixed_bytes(shard: ShardData, options: EngineOptions, kv: int) -> int:
    """What a rank holds besides its layer weights: the KV cache and its rows of the output head."""
    config = ModelConfig.from_dict(shard.meta["config"])
    cache = 2 * config.n_layers * options.n_ctx * kv * config.head_dim * 2
    head = sum(a.nbytes for n, a in shard.tensors.items() if n.startswith(("output.", "output_norm")))
    return int(cache + head * PREPACK_GROWTH)


def _needs_window(shard: ShardData, config: ModelConfig, options: EngineOptions, kv: int) -> bool:
    """Whether the rank's slices exceed ``options.memory_budget`` (estimated before compiling).

    Raises:
        ShardPlanError: they do, and there is no ``spill_dir`` for the per-layer files.
    """
    if options.memory_budget <= 0:
        return False
    layer_bytes = sum(a.nbytes for n, a in shard.tensors.items() if n.startswith("blk.")) * PREPACK_GROWTH
    if layer_bytes + _fixed_bytes(shard, options, kv) <= options.memory_budget:
        return False
    if options.spill_dir is None:
        raise ShardPlanError("this rank's slices exceed its memory budget and no spill directory was given")
    return True


def _file_backed(shard: ShardData, spill: Path) -> ShardData:
    """``shard`` memory-mapped from a file (the master's is in memory: written to ``spill`` first),
    so that its weights can leave memory once the layer programs hold their own copies."""
    if shard.path is not None:
        return shard
    path = spill / "shard.pshard"
    write_shard(path, shard.meta, shard.tensors)
    return read_shard(path)


def _cache_outputs(n_layers: int, first: int = 0, fused: bool = False) -> list[tuple[str, type]]:
    if fused:
        return [(f"{i}.present_{kv}", np.float16) for i in range(first, first + n_layers) for kv in "kv"]
    return [(f"{i}.new_{kv}", np.float16) for i in range(first, first + n_layers) for kv in "kv"]


#: Values of ``EngineOptions.attention``.
ATTENTION_MODES = ("exact", "fused")


def _fused_attention(options: EngineOptions) -> bool:
    """Whether a rank's attention is :func:`~potluck.sharding.compute.blocks.fused_attention`.

    Raises:
        ShardPlanError: ``options.attention`` is not one of :data:`ATTENTION_MODES`.
    """
    if options.attention not in ATTENTION_MODES:
        raise ShardPlanError(f"attention {options.attention!r} is not one of {', '.join(ATTENTION_MODES)}")
    return options.attention == "fused"


def _builder(options: EngineOptions) -> GraphBuilder:
    return GraphBuilder(accuracy_level=options.accuracy_level)


def _options(options: EngineOptions, owns_cores: bool = False) -> ort.SessionOptions:
    """Session options of a rank's programs; ``owns_cores``: the rank is one program (N = 1)."""
    spinning = owns_cores if options.spinning is None else options.spinning
    return session_options(options.threads, spinning)


class TPMaster:
    """Rank 0: embeds tokens, drives the workers, gathers the vocab-parallel head's logits.

    Args:
        compute: rank 0's layer slices and head rows.
        shard: rank 0's shard (needs ``token_embd.raw``).
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
        self._vocab = [(sh.vocab_start, sh.vocab_count) for sh in compute.plan.shares]

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
            x = rows.astype(np.float32)
        else:
            x = quants.dequantize(rows, self._embd_type).astype(np.float32).reshape(len(ids), self.config.hidden)
        return x * np.float32(self.config.embed_scale) if self.config.embed_scale != 1.0 else x

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
        rows = np.arange(len(ids), dtype=np.int64) if all_logits else np.array([len(ids) - 1], np.int64)
        compute = self.compute
        if compute.stack is not None:
            return compute.forward_logits(x, pos, rows)
        collective = self.collective
        if collective is not None:
            collective.broadcast({"op": "forward", "pos": pos, "n": len(ids), "rows": rows.tolist()}, x)
        h = compute.forward(x, pos, collective.all_reduce if collective is not None else None)
        logits = np.empty((len(rows), self.config.vocab), np.float32)
        for c0, chunk in _row_chunks(compute.plan, rows):
            own = compute.head_logits(h, chunk)
            if collective is None:
                parts = [own]
            else:
                t0 = time.perf_counter()
                parts = collective.gather(own, [(len(chunk), count) for _, count in self._vocab])
                compute.stats.comm_s += time.perf_counter() - t0
            for (start, count), part in zip(self._vocab, parts, strict=True):
                logits[c0 : c0 + len(chunk), start : start + count] = part
        return logits

    def gather_stats(self) -> list[RankStats]:
        """Every rank's :class:`RankStats` (one extra all-reduce)."""
        own = self.compute.stats_now()
        if self.collective is None:
            return [own]
        self.collective.broadcast({"op": "stats"})
        vec = np.zeros((self.world_size, len(own.row())), np.float32)
        vec[0] = own.row()
        return [RankStats.from_row(r) for r in self.collective.all_reduce(vec)]

    def reset_stats(self) -> None:
        if self.collective is not None:
            self.collective.broadcast({"op": "reset_stats"})
        self.compute.stats = RankStats()

    def shutdown(self) -> None:
        """Tell the workers to exit their loop (best effort), close the collective and this rank."""
        try:
            if self.collective is not None:
                try:
                    self.collective.broadcast({"op": "stop"})
                finally:
                    self.collective.close()
        finally:
            self.compute.close()


def serve_worker(collective: Collective, compute: RankCompute) -> None:
    """A worker's loop: run what the master broadcasts until it says ``stop``.

    Raises:
        ProtocolViolation: an unknown op or a malformed forward (shape, dtype, positions).
        TransferError / ClosedError: the master went away.
    """
    try:
        _serve(collective, compute)
    finally:
        compute.close()


#: Largest logits slice a rank sends in one gather frame, bytes: a prefill that wants every row's
#: logits (perplexity) is gathered in chunks of rows, within the star's frame limit.
GATHER_FRAME_BYTES = 16 << 20


def gather_chunk_rows(plan: ShardPlan) -> int:
    """Rows of logits per gather, so that no rank's slice exceeds :data:`GATHER_FRAME_BYTES`."""
    widest = max(1, max(s.vocab_count for s in plan.shares))
    return max(1, GATHER_FRAME_BYTES // (4 * widest))


def _row_chunks(plan: ShardPlan, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, rows[offset:offset + k])`` with ``k = gather_chunk_rows(plan)``: the gathers of one
    forward pass, the same on the master and every worker."""
    step = gather_chunk_rows(plan)
    for c0 in range(0, len(rows), step):
        yield c0, rows[c0 : c0 + step]


def _send_head_logits(collective: Collective, compute: RankCompute, h: np.ndarray, rows: np.ndarray) -> None:
    """A worker's side of the vocab-parallel head: its logits slice for ``rows``, chunk by chunk."""
    for _, chunk in _row_chunks(compute.plan, rows):
        part = compute.head_logits(h, chunk)
        t0 = time.perf_counter()
        collective.gather(part)
        compute.stats.comm_s += time.perf_counter() - t0


def _serve(collective: Collective, compute: RankCompute) -> None:
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
            rows = header.get("rows")
            if not isinstance(rows, list) or not rows or not all(type(r) is int and 0 <= r < n for r in rows):
                raise ProtocolViolation(f"malformed forward rows in {header!r}")
            h = compute.forward(array, pos, collective.all_reduce)
            _send_head_logits(collective, compute, h, np.asarray(rows, np.int64))
        elif op == "stats":
            row = compute.stats_now().row()
            vec = np.zeros((collective.world_size, len(row)), np.float32)
            vec[collective.rank] = row
            collective.all_reduce(vec)
        elif op == "reset_stats":
            compute.stats = RankStats()
        elif op == "stop":
            log.info("rank %d: master said stop", collective.rank)
            return
        else:
            raise ProtocolViolation(f"unknown op {op!r}")
