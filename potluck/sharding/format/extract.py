"""Cut one rank's slices out of a GGUF and lay them out for ONNX Runtime.

Linear layers are stored in the layout of ONNX Runtime's ``MatMulNBits`` (see
:mod:`potluck.sharding.format.nbits`): every block-quantized GGUF type llama.cpp files use (Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) is carried over without re-quantizing, as 4-bit (``q`` of at
most 4 bits) or 8-bit integers in 16- or 32-element blocks with the file's own scales, plus a
per-block bias for the types with a minimum. F32 / F16 stay as they are (``W`` of shape ``(N, K)``;
BF16 is widened to F32). Types without an exact layout (the IQ and ternary types) are dequantized
with ``gguf.quants`` and re-quantized to Q4_0 (< 5 bits/weight) or Q8_0, with a warning: that is lossy.

Column-parallel tensors (Q/K/V, gate/up) are sliced by rows, row-parallel ones (o_proj, down) by
columns on 32-element boundaries (:mod:`potluck.sharding.format.plan` guarantees alignment); a
K-quant's 256-element super-block is decoded whole, then cut at its 16/32-element sub-blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, quants
from gguf import GGMLQuantizationType as QT
from gguf.gguf_reader import ReaderTensor

from potluck.errors import ModelFileError, ShardPlanError
from potluck.sharding.format.gguf_tensors import (
    ModelConfig,
    bytes_per_element,
    raw_rows,
    read_config,
    tensor_map,
)
from potluck.sharding.format.nbits import Q4_0_BYTES, decode_rows, q4_0_to_nbits, supported
from potluck.sharding.format.pages import release_array
from potluck.sharding.format.plan import PlanGeometry, ShardPlan
from potluck.sharding.format.shard_file import ShardData, ShardWriter

log = logging.getLogger(__name__)

SHARD_KIND = "potluck-tp-shard"
BLOCK = 32


def _requant_target(qtype: QT) -> QT:
    return QT.Q4_0 if bytes_per_element_of(qtype) * 8 < 5 else QT.Q8_0


def bytes_per_element_of(qtype: QT) -> float:
    """Storage bytes per element of a GGML type."""
    block, size = GGML_QUANT_SIZES[qtype]
    return size / block


def slice_linear(tensor: ReaderTensor, rows: slice, cols: slice) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Slice ``W[rows, cols]`` (``W`` is ``(out, in)``) of a GGUF weight into engine layout.

    Returns:
        ``(layout, arrays)``: layout ``{"kind": "q4"|"q8"|"f32"|"f16", "n": rows, "k": cols}``, for
        the quantized kinds also ``"block"`` (16 or 32); arrays ``{"B", "scales"}``
        and, for types with a minimum, ``"block_bias"`` float32 ``(n, cols/block)``, or ``{"W"}``.

    Raises:
        ModelFileError: columns not on 32-element boundaries, or a type gguf cannot dequantize.
    """
    qtype = QT(tensor.tensor_type)
    rows_raw = raw_rows(tensor)[rows]
    k_total = int(tensor.shape[0])
    c0, c1, _ = cols.indices(k_total)
    if qtype in (QT.F32, QT.F16):
        w = np.ascontiguousarray(rows_raw[:, c0:c1])
        return {"kind": "f32" if qtype == QT.F32 else "f16", "n": w.shape[0], "k": w.shape[1]}, {"W": w}
    if qtype == QT.BF16:
        w = np.ascontiguousarray(quants.dequantize(np.ascontiguousarray(rows_raw), qtype)[:, c0:c1], np.float32)
        return {"kind": "f32", "n": w.shape[0], "k": w.shape[1]}, {"W": w}
    if c0 % BLOCK or c1 % BLOCK:
        raise ModelFileError(f"{tensor.name}: column slice {c0}:{c1} is not on {BLOCK}-element blocks")
    n = rows_raw.shape[0]
    if qtype == QT.Q4_0:  # the common case, repacked without decoding
        raw = rows_raw.reshape(n, -1, Q4_0_BYTES)[:, c0 // BLOCK : c1 // BLOCK].reshape(n, -1)
        b, s = q4_0_to_nbits(raw)
        layout = {"kind": "q4", "n": n, "k": c1 - c0, "block": BLOCK}
        return layout, {"B": b, "scales": s}
    if supported(qtype):
        decoded = decode_rows(rows_raw, qtype).columns(c0, c1)
    else:
        try:
            dense = quants.dequantize(np.ascontiguousarray(rows_raw), qtype)[:, c0:c1]
        except NotImplementedError as exc:
            raise ModelFileError(f"{tensor.name}: tensor type {qtype.name} cannot be dequantized") from exc
        target = _requant_target(qtype)
        log.warning("%s: %s has no exact layout; re-quantized to %s (lossy)", tensor.name, qtype.name, target.name)
        decoded = decode_rows(quants.quantize(np.ascontiguousarray(dense, dtype=np.float32), target), target)
    b, s = decoded.to_nbits()
    kind = "q4" if decoded.bits == 4 else "q8"
    layout = {"kind": kind, "n": n, "k": c1 - c0, "block": decoded.block}
    arrays = {"B": b, "scales": s}
    if decoded.block_bias is not None:
        arrays["block_bias"] = np.ascontiguousarray(decoded.block_bias, dtype=np.float32)
    return layout, arrays


def fuse_linears(
    linears: dict[str, dict[str, Any]], tensors: dict[str, np.ndarray], name: str, parts: list[str]
) -> None:
    """Stack the output rows of linears ``parts`` (same input) into one linear ``name``, in place.

    One ``MatMulNBits`` over the stacked rows (Q/K/V, gate/up) replaces several: fewer kernel
    launches, input quantizations and thread-pool rounds per token. The layout gains ``"parts"``
    (the row counts, for the ``Split`` after it). Linears of different kinds or block sizes, or
    with and without block biases (a Q4_K_M file has ``attn_v`` in Q6_K, 8-bit in 16-blocks, and
    ``attn_q`` in Q4_K, 4-bit with biases), are left as they are.
    """
    layouts = [linears[p] for p in parts]
    shapes = {
        (lay["kind"], lay["k"], lay.get("block", BLOCK), f"{p}.block_bias" in tensors)
        for p, lay in zip(parts, layouts, strict=True)
    }
    if len(shapes) != 1:
        return
    keys = ("B", "scales", "block_bias") if layouts[0]["kind"] in ("q4", "q8") else ("W",)
    for key in keys:
        if f"{parts[0]}.{key}" in tensors:
            tensors[f"{name}.{key}"] = np.concatenate([tensors.pop(f"{p}.{key}") for p in parts])
    if any(f"{p}.bias" in tensors for p in parts):
        tensors[f"{name}.bias"] = np.concatenate(
            [tensors.pop(f"{p}.bias", np.zeros(lay["n"], np.float32)) for p, lay in zip(parts, layouts, strict=True)]
        )
    linears[name] = {
        **{key: layouts[0][key] for key in ("kind", "k", "block") if key in layouts[0]},
        "n": sum(int(lay["n"]) for lay in layouts),
        "parts": [int(lay["n"]) for lay in layouts],
    }
    for p in parts:
        del linears[p]


def plan_geometry(reader: GGUFReader, config: ModelConfig, n_ctx: int) -> PlanGeometry:
    """Per-unit memory sizes of a GGUF for :func:`potluck.sharding.format.plan.make_plan`."""
    t = tensor_map(reader)
    c = config
    hd, h = c.head_dim, c.hidden
    kv_group = ffn_block = replicated = 0.0
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        kv_group += (
            c.group * hd * h * bytes_per_element(t[p + "attn_q.weight"])
            + hd * h * bytes_per_element(t[p + "attn_k.weight"])
            + hd * h * bytes_per_element(t[p + "attn_v.weight"])
            + h * c.group * hd * bytes_per_element(t[p + "attn_output.weight"])
        )
        ffn_block += BLOCK * h * sum(bytes_per_element(t[p + f"ffn_{x}.weight"]) for x in ("gate", "up", "down"))
        replicated += (4 if c.post_norms else 2) * h * 4 + (2 * hd * 4 if c.qk_norm else 0)
    head = t.get("output.weight") or t["token_embd.weight"]  # tied embeddings: the head is token_embd
    replicated += h * 4  # output_norm, on every rank with a head slice
    return PlanGeometry(
        n_layers=c.n_layers,
        n_kv_heads=c.n_kv_heads,
        group=c.group,
        head_dim=hd,
        hidden=h,
        ffn=c.ffn,
        kv_group_bytes=int(kv_group / c.n_layers),
        kv_cache_group_bytes=2 * n_ctx * hd * 2,
        ffn_block_bytes=int(ffn_block / c.n_layers),
        replicated_bytes=int(replicated),
        master_bytes=int(t["token_embd.weight"].n_bytes),
        vocab=c.vocab,
        head_row_bytes=int(head.n_bytes) // c.vocab,
    )


def extract_shard(reader: GGUFReader, plan: ShardPlan, rank: int) -> ShardData:
    """Everything rank ``rank`` needs under ``plan``, in engine layout (in memory).

    Tensor names: ``blk.L.{attn_qkv,attn_output,ffn_gate_up,ffn_down}.{B,scales,block_bias,W,bias}``
    (Q/K/V and gate/up stacked by :func:`fuse_linears`; ``attn_q``... separately when their layouts
    differ), ``blk.L.{attn_norm,ffn_norm}`` (and where the family has them ``attn_q_norm``,
    ``attn_k_norm``, ``post_attention_norm``, ``post_ffw_norm``); rank 0 also ``token_embd.raw`` (GGUF
    rows, any type); every rank with output-head rows (the share's vocab range) ``output_norm`` and
    ``output.*`` (those rows of ``output.weight``, or of ``token_embd.weight`` when they are tied).

    Raises:
        ModelFileError: a tensor is missing or has an unsupported type.
        ShardPlanError: the plan does not match the model.
    """
    tensors: dict[str, np.ndarray] = {}
    meta = _extract(reader, plan, rank, tensors.__setitem__)
    return ShardData(meta=meta, tensors=tensors)


def extract_shard_to(reader: GGUFReader, plan: ShardPlan, rank: int, path: Path) -> int:
    """:func:`extract_shard` streamed into the shard file ``path``, one layer at a time: the memory
    it holds is one layer's slices (plus the GGUF's pages the OS maps in), not the whole shard.

    Returns:
        The file size, bytes.

    Raises:
        as :func:`extract_shard`; OSError when the file cannot be written.
    """
    with ShardWriter(path) as writer:
        meta = _extract(reader, plan, rank, writer.add)
        return writer.finish(meta)


def _extract(reader: GGUFReader, plan: ShardPlan, rank: int, emit: Callable[[str, np.ndarray], None]) -> dict[str, Any]:
    """Hand every tensor of rank ``rank``'s shard to ``emit`` (layer by layer); returns the metadata."""
    config = read_config(reader)
    if (plan.n_layers, plan.n_heads, plan.n_kv_heads, plan.ffn) != (
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.ffn,
    ):
        raise ShardPlanError("shard plan geometry does not match the model")
    t = tensor_map(reader)
    share = plan.shares[rank]
    hd, g = config.head_dim, config.group
    q_rows = slice(share.kv_start * g * hd, (share.kv_start + share.kv_count) * g * hd)
    kv_rows = slice(share.kv_start * hd, (share.kv_start + share.kv_count) * hd)
    f_rows = slice(share.ffn_start, share.ffn_start + share.ffn_count)
    every = slice(None)
    tensors: dict[str, np.ndarray] = {}
    linears: dict[str, dict[str, Any]] = {}

    used: list[ReaderTensor] = []

    def flush() -> None:
        for name, arr in tensors.items():
            emit(name, arr)
        tensors.clear()
        for src in used:  # the GGUF's pages this layer read leave memory (a model may exceed it)
            release_array(src.data)
        used.clear()

    def need(name: str) -> ReaderTensor:
        if name not in t:
            raise ModelFileError(f"GGUF tensor {name} is missing")
        used.append(t[name])
        return t[name]

    def add_linear(name: str, rows: slice, cols: slice) -> None:
        layout, arrays = slice_linear(need(name + ".weight"), rows, cols)
        linears[name] = layout
        for key, arr in arrays.items():
            tensors[f"{name}.{key}"] = arr

    def add_vector(name: str, src: str, part: slice = every) -> None:
        tensors[name] = np.ascontiguousarray(np.asarray(need(src).data, dtype=np.float32).reshape(-1)[part])

    for layer in range(config.n_layers):
        p = f"blk.{layer}."
        add_vector(p + "attn_norm", p + "attn_norm.weight")
        add_vector(p + "ffn_norm", p + "ffn_norm.weight")
        if config.post_norms:  # applied after the all-reduce, so every rank holds them
            add_vector(p + "post_attention_norm", p + "post_attention_norm.weight")
            add_vector(p + "post_ffw_norm", p + "post_ffw_norm.weight")
        if share.kv_count:
            add_linear(p + "attn_q", q_rows, every)
            add_linear(p + "attn_k", kv_rows, every)
            add_linear(p + "attn_v", kv_rows, every)
            add_linear(p + "attn_output", every, q_rows)
            if config.qk_norm:  # per head, shared by every head
                add_vector(p + "attn_q_norm", p + "attn_q_norm.weight")
                add_vector(p + "attn_k_norm", p + "attn_k_norm.weight")
            if config.qkv_bias:
                add_vector(p + "attn_q.bias", p + "attn_q.bias", q_rows)
                add_vector(p + "attn_k.bias", p + "attn_k.bias", kv_rows)
                add_vector(p + "attn_v.bias", p + "attn_v.bias", kv_rows)
            fuse_linears(linears, tensors, p + "attn_qkv", [p + "attn_q", p + "attn_k", p + "attn_v"])
        if share.ffn_count:
            add_linear(p + "ffn_gate", f_rows, every)
            add_linear(p + "ffn_up", f_rows, every)
            add_linear(p + "ffn_down", every, f_rows)
            fuse_linears(linears, tensors, p + "ffn_gate_up", [p + "ffn_gate", p + "ffn_up"])
        flush()
    embedding: dict[str, Any] | None = None
    if rank == 0:
        embd = need("token_embd.weight")
        tensors["token_embd.raw"] = np.ascontiguousarray(raw_rows(embd))
        embedding = {"qtype": int(embd.tensor_type), "n": config.vocab, "k": config.hidden}
    if share.vocab_count:
        add_vector("output_norm", "output_norm.weight")
        head = "output" if not config.tied_embeddings else "token_embd"
        vocab_rows = slice(share.vocab_start, share.vocab_start + share.vocab_count)
        layout, arrays = slice_linear(need(head + ".weight"), vocab_rows, every)
        linears["output"] = layout
        for key, arr in arrays.items():
            tensors[f"output.{key}"] = arr
    flush()
    return {
        "kind": SHARD_KIND,
        "rank": rank,
        "plan": plan.to_dict(),
        "config": config.to_dict(),
        "linears": linears,
        "embedding": embedding,
    }
