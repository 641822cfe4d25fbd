"""The llama-family transformer block as ONNX subgraphs: RMSNorm, attention over a KV cache, SwiGLU, head.

Each function appends nodes to a :class:`~potluck.sharding.compute.onnx_ops.GraphBuilder` and returns the
name of its output, so the engine can put a whole N = 1 model (every layer and the head) into one
graph, or cut the same blocks at the all-reduce points for N > 1 (Megatron-LM, Shoeybi et al. 2019,
§3: the attention and FFN blocks of a rank end in row-parallel partial sums).

Numerics follow llama.cpp's CPU path (see :mod:`potluck.sharding.compute.engine`): K and V are stored as
float16 and Q and the softmax probabilities are rounded to float16 before they meet them
(llama.cpp's F16 cache); RoPE uses ORT's ``com.microsoft.RotaryEmbedding``
(interleaved pairs for llama's "normal" mode, halves for "neox") on the precomputed cos/sin tables.

Graph inputs a block reads (declared by :func:`declare_inputs`):

- ``pos_ids`` int64 ``(1, T)``: positions of the ``T`` new tokens.
- ``mask`` float32 ``(T, S)``: additive causal mask over the ``S = P + T`` cached + new positions.
- ``L.past_k`` / ``L.past_v`` float16 ``(P, kv, hd)``: layer ``L``'s cached keys/values (this rank's
  KV heads); the block outputs the new rows as ``L.new_k`` / ``L.new_v`` float16 ``(T, kv, hd)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from potluck.sharding.compute.onnx_ops import GraphBuilder
from potluck.sharding.format.gguf_tensors import ModelConfig

#: Fused attention's inputs: int32 ``(1,)`` the last new position (P + T - 1), int32 ``()`` P + T.
SEQLENS_K, TOTAL_LEN = "seqlens_k", "total_len"
#: The causal mask tiled over the query heads of a KV group: float32 ``(g*T, S)``, row ``j*T + t``.
MASK_G = "mask.g"
#: The same for the sliding-window layers (input ``mask_local``; models with a sliding window only).
MASK_G_LOCAL = "mask.g.local"


def declare_inputs(gb: GraphBuilder, config: ModelConfig, attention: bool = True, fused: bool = False) -> None:
    """Declare ``x`` float32 ``(T, hidden)`` and, for graphs with attention, ``pos_ids`` and ``mask``
    (``fused``: ``seqlens_k`` int32 ``(1,)`` = P + T - 1 and ``total_len`` int32 ``()`` = P + T, the
    inputs of :func:`fused_attention`)."""
    gb.add_input("x", np.float32, ["T", config.hidden])
    if not attention:
        return
    if fused:
        gb.add_input(SEQLENS_K, np.int32, [1])
        gb.add_input(TOTAL_LEN, np.int32, [])
        return
    gb.add_input("pos_ids", np.int64, [1, "T"])
    gb.add_input("mask", np.float32, ["T", "S"])
    gb.node("Tile", ["mask", _shape(gb, "mask.reps", [config.group, 1])], MASK_G)
    if config.sliding_window:
        gb.add_input("mask_local", np.float32, ["T", "S"])
        gb.node("Tile", ["mask_local", "mask.reps"], MASK_G_LOCAL)


def rms_norm(gb: GraphBuilder, x: str, name: str, weight: np.ndarray, eps: float) -> str:
    """RMSNorm (Zhang & Sennrich 2019) of float32 ``(T, d)`` rows: ``x / sqrt(mean(x^2) + eps) * weight``.

    One ``SimplifiedLayerNormalization`` node (ORT's fused RMSNorm, float accumulation). llama.cpp sums
    the squares in float64; on random rows both this and an exact float64 computation differ from
    llama.cpp's result in the last bit for about a third of the elements, so the fused op costs no
    fidelity, and 1 node instead of 10 (float64 casts, reduce, sqrt, ...) per norm.
    """
    w = gb.constant(f"{name}.w", weight)
    return gb.node("SimplifiedLayerNormalization", [x, w], f"{name}.out", axis=-1, epsilon=eps, stash_type=1)


def _head_norm(gb: GraphBuilder, x: str, name: str, weight: np.ndarray, heads: int, config: ModelConfig) -> str:
    """RMSNorm of each head of ``x`` float32 ``(T, heads * hd)`` over its ``hd`` values (Q/K norm)."""
    hd = config.head_dim
    rows = gb.node("Reshape", [x, _shape(gb, f"{name}.rows", [-1, hd])], f"{name}.in")
    normed = rms_norm(gb, rows, name, weight, config.rms_eps)
    return gb.node("Reshape", [normed, _shape(gb, f"{name}.back", [-1, heads * hd])], f"{name}.heads")


def gelu_f16_table(gb: GraphBuilder, x: str, name: str) -> str:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), as ggml's CPU ``ggml_vec_geglu_f32`` computes
    it: the input rounded to float16, ``0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`` looked up
    in a float16 table (so the output is float16-rounded too); 0 below -10, ``x`` above 10."""
    x16 = _round_f16(gb, x)
    c = {
        k: gb.constant(f"{name}.{k}", np.array(v, np.float32))
        for k, v in {"a": 0.044715, "s": np.sqrt(2.0 / np.pi), "half": 0.5, "one": 1.0, "lo": -10.0, "hi": 10.0}.items()
    }
    ax2 = gb.node("Mul", [gb.node("Mul", [c["a"], x16], f"{name}.ax"), x16], f"{name}.ax2")
    inner = gb.node("Add", [c["one"], ax2], f"{name}.in1")
    arg = gb.node("Mul", [gb.node("Mul", [c["s"], x16], f"{name}.sx"), inner], f"{name}.arg")
    tanh1 = gb.node("Add", [c["one"], gb.node("Tanh", [arg], f"{name}.tanh")], f"{name}.t1")
    y = _round_f16(gb, gb.node("Mul", [gb.node("Mul", [c["half"], x16], f"{name}.hx"), tanh1], f"{name}.y"))
    y = gb.node("Where", [gb.node("Less", [x, c["hi"]], f"{name}.ltHi"), y, x], f"{name}.hiOut")
    zero = gb.constant(f"{name}.zero", np.array(0.0, np.float32))
    return gb.node("Where", [gb.node("Greater", [x, c["lo"]], f"{name}.gtLo"), y, zero], f"{name}.out")


def _round_f16(gb: GraphBuilder, x: str) -> str:
    half = gb.node("Cast", [x], f"{x}.h", to=TensorProto.FLOAT16)
    return gb.node("Cast", [half], f"{x}.r16", to=TensorProto.FLOAT)


def _linears(
    gb: GraphBuilder,
    x: str,
    p: str,
    names: tuple[str, tuple[str, ...]],
    linears: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
) -> list[str]:
    """Outputs of the linears ``names[1]`` on ``x``: one stacked linear ``names[0]`` + ``Split`` when
    the shard has it (:func:`potluck.sharding.format.extract.fuse_linears`), else one linear each."""
    fused, parts = names
    if p + fused not in linears:
        return [gb.linear(x, p + n, linears[p + n], tensors) for n in parts]
    layout = linears[p + fused]
    out = gb.linear(x, p + fused, layout, tensors)
    outs = [f"{p}{n}.out" for n in parts]
    split = gb.constant(f"{p}{fused}.split", np.array(layout["parts"], np.int64))
    gb.nodes.append(helper.make_node("Split", [out, split], outs, axis=-1))
    return outs


def _shape(gb: GraphBuilder, name: str, dims: list[int]) -> str:
    return gb.constant(name, np.array(dims, np.int64))


def _qkv(
    gb: GraphBuilder,
    a: str,
    layer: int,
    config: ModelConfig,
    kv: int,
    linears: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
) -> tuple[str, str, str]:
    """This rank's Q, K, V float32 ``(T, heads * hd)`` of the normed ``a``, Q/K RMSNormed per head
    where the family has Q/K norms."""
    p, n = f"blk.{layer}.", f"l{layer}"
    q, k, v = _linears(gb, a, p, ("attn_qkv", ("attn_q", "attn_k", "attn_v")), linears, tensors)
    if config.qk_norm:
        q = _head_norm(gb, q, f"{n}.q_norm", tensors[p + "attn_q_norm"], kv * config.group, config)
        k = _head_norm(gb, k, f"{n}.k_norm", tensors[p + "attn_k_norm"], kv, config)
    return q, k, v


def attention(
    gb: GraphBuilder,
    layer: int,
    h: str,
    config: ModelConfig,
    kv: int,
    linears: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    rope: tuple[str, str],
) -> str:
    """RMSNorm, this rank's Q/K/V, RoPE, causal GQA attention over the KV cache, o_proj partial sum.

    Args:
        gb: the graph (with :func:`declare_inputs` done).
        layer: layer index ``L`` (names ``blk.L.*``; declares inputs ``L.past_k``/``L.past_v``).
        h: residual stream float32 ``(T, hidden)``.
        config: model geometry.
        kv: this rank's KV heads (each with ``config.group`` query heads).
        linears: layouts from the shard's metadata.
        tensors: the shard's arrays.
        rope: names of the cos/sin tables float32 ``(n_ctx, hd/2)``.

    Returns:
        The o_proj partial sum float32 ``(T, hidden)``; also writes graph outputs ``L.new_k`` and
        ``L.new_v`` float16 ``(T, kv, hd)`` (the caller binds them to the cache rows).
    """
    p, hd, g = f"blk.{layer}.", config.head_dim, config.group
    n = f"l{layer}"
    past_k = gb.add_input(f"{layer}.past_k", np.float16, ["P", kv, hd])
    past_v = gb.add_input(f"{layer}.past_v", np.float16, ["P", kv, hd])
    a = rms_norm(gb, h, f"{n}.attn_norm", tensors[p + "attn_norm"], config.rms_eps)
    q, k, v = _qkv(gb, a, layer, config, kv, linears, tensors)
    interleaved = 1 if config.rope_mode == "normal" else 0
    cos, sin = rope

    def rotate(x: str, heads: int, tag: str) -> str:
        x3 = gb.node("Unsqueeze", [x, _shape(gb, f"{n}.ax0", [0])], f"{n}.{tag}u")  # (1, T, heads*hd)
        return gb.node(
            "RotaryEmbedding",
            [x3, "pos_ids", cos, sin],
            f"{n}.{tag}rot",
            domain="com.microsoft",
            interleaved=interleaved,
            num_heads=heads,
        )

    q = rotate(q, kv * g, "q")
    k = rotate(k, kv, "k")
    tkv = _shape(gb, f"{n}.tkv", [-1, kv, hd])
    new_k = gb.node("Cast", [gb.node("Reshape", [k, tkv], f"{n}.k3")], f"{layer}.new_k", to=TensorProto.FLOAT16)
    new_v = gb.node("Cast", [gb.node("Reshape", [v, tkv], f"{n}.v3")], f"{layer}.new_v", to=TensorProto.FLOAT16)
    keys = gb.node("Cast", [gb.node("Concat", [past_k, new_k], f"{n}.kc", axis=0)], f"{n}.kf", to=TensorProto.FLOAT)
    vals = gb.node("Cast", [gb.node("Concat", [past_v, new_v], f"{n}.vc", axis=0)], f"{n}.vf", to=TensorProto.FLOAT)
    keys_t = gb.node("Transpose", [keys], f"{n}.kt", perm=[1, 2, 0])  # (kv, hd, S)
    vals_t = gb.node("Transpose", [vals], f"{n}.vt", perm=[1, 0, 2])  # (kv, S, hd)
    # query heads grouped under their KV head: (T, kv, g, hd) -> (kv, g*T, hd), rounded like the F16 cache path
    q4 = gb.node("Reshape", [q, _shape(gb, f"{n}.tkgh", [-1, kv, g, hd])], f"{n}.q4")
    qg = gb.node("Transpose", [q4], f"{n}.qt", perm=[1, 2, 0, 3])  # (kv, g, T, hd)
    qg = gb.node("Reshape", [_round_f16(gb, qg), _shape(gb, f"{n}.kxh", [kv, -1, hd])], f"{n}.qg")
    scores = gb.node("MatMul", [qg, keys_t], f"{n}.s")  # (kv, g*T, S)
    scale = gb.constant(f"{n}.scale", np.array(1.0 / np.sqrt(hd), np.float32))
    scores = gb.node("Mul", [scores, scale], f"{n}.ss")
    mask = MASK_G_LOCAL if config.is_local(layer) else MASK_G
    probs = gb.node("Softmax", [gb.node("Add", [scores, mask], f"{n}.sm")], f"{n}.p", axis=-1)
    out = gb.node("MatMul", [_round_f16(gb, probs), vals_t], f"{n}.o")  # (kv, g*T, hd)
    out = gb.node("Reshape", [out, _shape(gb, f"{n}.kgth", [kv, g, -1, hd])], f"{n}.o4")
    out = gb.node("Transpose", [out], f"{n}.ot", perm=[2, 0, 1, 3])  # (T, kv, g, hd)
    out = gb.node("Reshape", [out, _shape(gb, f"{n}.tq", [-1, kv * g * hd])], f"{n}.attn")
    return gb.linear(out, p + "attn_output", linears[p + "attn_output"], tensors)


def fused_attention(
    gb: GraphBuilder,
    layer: int,
    h: str,
    config: ModelConfig,
    kv: int,
    linears: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    rope: tuple[str, str],
) -> str:
    """The same block as :func:`attention` in a few kernels: RMSNorm, one QKV linear, ORT's
    ``com.microsoft.GroupQueryAttention`` (RoPE, KV-cache append, causal or sliding-window GQA in
    one CPU kernel; ORT contrib-op spec, ``local_window_size`` as llama.cpp's SWA) and the o_proj
    partial sum (``EngineOptions.attention = "fused"``).

    The KV cache is float16 ``(1, kv, n_ctx, hd)`` per layer (as llama.cpp's default F16 cache, so
    the same bytes), bound as both ``L.past_k`` and ``L.present_k``: ORT writes the new rows in
    place at positions ``P .. P+T-1``, from the inputs ``seqlens_k`` and ``total_len``. The kernel
    runs in float16 (Q, K, V, RoPE and the ``rope`` tables rounded to it), so results differ from
    llama.cpp's (float32 RoPE, float16 K/V) in the last float16 bits; :func:`attention` reproduces
    llama.cpp bit for bit. Measured on the 1.1B bench model: 1-2.5 ms/token faster than
    :func:`attention`, the same perplexity on real models, but greedy answers diverge from
    llama.cpp's sooner (SmolLM2 Q4_1, 20 chat prompts: median 17.5 tokens of 32 against 25.5). Also
    measured and dropped: RoPE in float32 before a float16 kernel (11.5 of 32), a float32 kernel on
    float16-rounded Q/K/V with a float32 cache (14.0, twice the memory); a float32 cache alone
    would be 0.75 ms faster. Arguments and return value as :func:`attention` (``rope``: float16 tables).
    """
    p, hd, g = f"blk.{layer}.", config.head_dim, config.group
    n = f"l{layer}"
    cache: list[int | str] = [1, kv, "C", hd]
    past_k = gb.add_input(f"{layer}.past_k", np.float16, cache)
    past_v = gb.add_input(f"{layer}.past_v", np.float16, cache)
    a = rms_norm(gb, h, f"{n}.attn_norm", tensors[p + "attn_norm"], config.rms_eps)
    if p + "attn_qkv" in linears and not config.qk_norm:
        qkv = gb.linear(a, p + "attn_qkv", linears[p + "attn_qkv"], tensors)
    else:
        qkv = gb.node("Concat", list(_qkv(gb, a, layer, config, kv, linears, tensors)), f"{n}.qkv", axis=-1)
    packed = gb.node("Unsqueeze", [qkv, _shape(gb, f"{n}.ax0", [0])], f"{n}.qkv3")  # (1, T, (H + 2kv) hd)
    packed = gb.node("Cast", [packed], f"{n}.qkv16", to=TensorProto.FLOAT16)
    window = config.sliding_window if config.is_local(layer) else -1
    cos, sin = rope
    out = f"{n}.gqa"
    gb.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [packed, "", "", past_k, past_v, SEQLENS_K, TOTAL_LEN, cos, sin],
            [out, f"{layer}.present_k", f"{layer}.present_v"],
            domain="com.microsoft",
            num_heads=kv * g,
            kv_num_heads=kv,
            do_rotary=1,
            rotary_interleaved=1 if config.rope_mode == "normal" else 0,
            scale=float(1.0 / np.sqrt(hd)),
            local_window_size=window,
        )
    )
    out = gb.node("Cast", [out], f"{n}.gqa32", to=TensorProto.FLOAT)
    flat = gb.node("Squeeze", [out, f"{n}.ax0"], f"{n}.attn")  # (T, H hd)
    return gb.linear(flat, p + "attn_output", linears[p + "attn_output"], tensors)


def ffn(
    gb: GraphBuilder,
    layer: int,
    h: str,
    config: ModelConfig,
    linears: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
) -> str:
    """RMSNorm and SwiGLU (Shazeer 2020) ``down(silu(gate(b)) * up(b))`` (GeGLU with ``gelu`` for
    ``config.ffn_act == "gelu"``): the down-proj partial sum."""
    p = f"blk.{layer}."
    b = rms_norm(gb, h, f"l{layer}.ffn_norm", tensors[p + "ffn_norm"], config.rms_eps)
    gate, up = _linears(gb, b, p, ("ffn_gate_up", ("ffn_gate", "ffn_up")), linears, tensors)
    if config.ffn_act == "gelu":
        gated = gelu_f16_table(gb, gate, f"{p}gelu")
    else:
        gated = gb.node("Mul", [gate, gb.node("Sigmoid", [gate], f"{p}sig")], f"{p}silu")
    act = gb.node("Mul", [gated, up], f"{p}act")
    return gb.linear(act, p + "ffn_down", linears[p + "ffn_down"], tensors)


def post_norm(
    gb: GraphBuilder, x: str, layer: int, kind: str, config: ModelConfig, tensors: Mapping[str, np.ndarray]
) -> str:
    """``x`` through ``blk.L.<kind>`` (Gemma 3's post-attention/post-FFN RMSNorm), or ``x`` itself
    for families without post-norms. Only valid on a whole sum (N = 1): RMSNorm is not linear."""
    if not config.post_norms:
        return x
    return rms_norm(gb, x, f"l{layer}.{kind}", tensors[f"blk.{layer}.{kind}"], config.rms_eps)


def head(
    gb: GraphBuilder,
    h: str,
    rows: str,
    config: ModelConfig,
    linears: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
) -> str:
    """Final RMSNorm and lm_head on the rows ``rows`` (int64 ``(R,)``) of ``h``: logits float32 ``(R, vocab)``."""
    picked = gb.node("Gather", [h, rows], "head.rows", axis=0)
    normed = rms_norm(gb, picked, "output_norm", tensors["output_norm"], config.rms_eps)
    return gb.linear(normed, "output", linears["output"], tensors)
