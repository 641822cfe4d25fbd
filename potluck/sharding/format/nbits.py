"""GGUF block-quantized rows -> ONNX Runtime ``MatMulNBits`` layout, without re-quantizing.

``MatMulNBits`` (com.microsoft contrib op,
https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits)
takes ``B`` uint8 ``(N, K/block, block*bits/8)``, ``scales`` float32 ``(N * K/block,)`` and, with
no zero-point input, the zero point ``2^(bits-1)``: element value ``scale * (u - 2^(bits-1))``.
4-bit elements are packed low nibble first (element ``2i`` in the low nibble of byte ``i``).
``block`` may be 16 or 32 here (ORT accepts powers of two >= 16).

Every ggml block type this module handles stores, per *sub-block* of 16 or 32 elements, integers
``q`` of ``qbits`` bits, and its value is affine in ``q`` within the sub-block (ggml
``ggml-common.h``, dequantized as in ``gguf.quants``):

- symmetric: ``value = s * (q - offset)`` (Q4_0, Q5_0, Q3_K, Q6_K; Q8_0 with ``q`` signed);
- with a per-block minimum: ``value = s * q + m`` (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K).

So each sub-block becomes one ``MatMulNBits`` block, 4-bit when ``qbits <= 4`` and 8-bit otherwise,
with ``u = q - 2^(qbits-1) + 2^(bits-1)`` and, for the types with a minimum, a per-block
*block bias* ``c = m + s * 2^(qbits-1)``: the layer then adds ``sum_j x_j`` over each block times
``c`` (one ``Gemm`` of the activations' block sums, ``(T, K/block) @ (K/block, N)``). This is exact
up to float32 rounding of ``s`` and ``c`` (relative 1e-7), where re-quantizing Q4_K to Q4_0 added a
5.9 % RMS error.

The bit layouts are not decoded here: ``gguf.quants.dequantize`` (the gguf-py reference decoder)
reads each block three times, as stored, with its ``q`` bytes zeroed (giving ``v0 = s * (0 -
offset)`` or ``m``) and, for the types with a minimum, with its ``q`` bytes all ones (``s *
qmax + m``). ``s`` and ``m`` follow, and ``q = round((value - v0) / s)``. Only which bytes of a
block hold ``q`` is type knowledge (:data:`FORMATS`). Q4_K, Q5_K and Q6_K, the bulk of the common
Q4_K_M / Q5_K_M downloads, are unpacked directly from their bits instead (integer work only):
``bench/tp_extract.py`` cuts a 1.1B Q4_K_M file in 5.3 s against 40 s through the probes, and
3.5 s for the same model in Q4_0 (a plain repack).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QT

Q4_0_BYTES = 18
Q8_0_BYTES = 34
_CHUNK_BYTES = 32 << 20  # float32 bytes of dequantized rows held at once while decoding


@dataclass(frozen=True)
class BlockFormat:
    """How a ggml block type stores its integers.

    Attributes:
        sub: elements per scale (16 or 32).
        qbits: bits per integer ``q`` (``q`` in ``[0, 2^qbits)``).
        q_bytes: byte ranges of one ggml block that hold ``q`` bits (low and high parts alike).
        offset: symmetric types: ``value = s * (q - offset)``; ``None``: ``value = s * q + m``.
    """

    sub: int
    qbits: int
    q_bytes: tuple[tuple[int, int], ...]
    offset: int | None


FORMATS: dict[QT, BlockFormat] = {
    QT.Q4_0: BlockFormat(32, 4, ((2, 18),), 8),
    QT.Q4_1: BlockFormat(32, 4, ((4, 20),), None),
    QT.Q5_0: BlockFormat(32, 5, ((2, 22),), 16),
    QT.Q5_1: BlockFormat(32, 5, ((4, 24),), None),
    QT.Q2_K: BlockFormat(16, 2, ((16, 80),), None),
    QT.Q3_K: BlockFormat(16, 3, ((0, 96),), 4),
    QT.Q4_K: BlockFormat(32, 4, ((16, 144),), None),
    QT.Q5_K: BlockFormat(32, 5, ((16, 176),), None),
    QT.Q6_K: BlockFormat(16, 6, ((0, 192),), 32),
}


@dataclass
class DecodedRows:
    """Block-quantized rows as integers and per-block scales (what :func:`decode_rows` returns).

    Attributes:
        q: int8 ``(N, K)``, centred: value ``= scales * q + block_bias`` per block.
        scales: float32 ``(N, K/block)``.
        block_bias: float32 ``(N, K/block)``, or ``None`` for symmetric types (all zero).
        block: elements per block (16 or 32).
        bits: ``MatMulNBits`` bits (4 or 8) that hold ``q``.
    """

    q: np.ndarray
    scales: np.ndarray
    block_bias: np.ndarray | None
    block: int
    bits: int

    def columns(self, c0: int, c1: int) -> DecodedRows:
        """Columns ``c0:c1`` (on block boundaries)."""
        b0, b1 = c0 // self.block, c1 // self.block
        bias = None if self.block_bias is None else self.block_bias[:, b0:b1]
        return DecodedRows(self.q[:, c0:c1], self.scales[:, b0:b1], bias, self.block, self.bits)

    def to_nbits(self) -> tuple[np.ndarray, np.ndarray]:
        """``B`` uint8 ``(N, K/block, block*bits/8)`` and ``scales`` float32 ``(N * K/block,)``."""
        n, k = self.q.shape
        nb = k // self.block
        out = np.empty((n, nb, self.block * self.bits // 8), np.uint8)
        step = max(1, _CHUNK_BYTES // max(1, k))  # rows per chunk: bounded temporaries
        for r in range(0, n, step):
            # u = q + 2^(bits-1) in uint8 arithmetic (wraps exactly: q is in range)
            u = (self.q[r : r + step].view(np.uint8) + np.uint8(1 << (self.bits - 1))).reshape(-1, nb, self.block)
            out[r : r + step] = (u[:, :, 0::2] | (u[:, :, 1::2] << 4)) if self.bits == 4 else u
        return out, np.ascontiguousarray(self.scales, dtype=np.float32).reshape(-1)


def supported(qtype: QT) -> bool:
    """Whether :func:`decode_rows` handles ``qtype`` (Q8_0 and the types of :data:`FORMATS`)."""
    return qtype == QT.Q8_0 or qtype in FORMATS


def decode_rows(raw: np.ndarray, qtype: QT) -> DecodedRows:
    """Decode GGUF rows of a block-quantized type into integers, scales and block biases.

    Args:
        raw: uint8 ``(N, row_bytes)``, whole GGUF rows.
        qtype: their ggml type (:func:`supported`).

    Returns:
        :class:`DecodedRows` with ``K = row_bytes / type_size * block_size`` columns.

    Raises:
        ValueError: an unsupported type.
    """
    raw = np.ascontiguousarray(raw)
    n = raw.shape[0]
    if qtype == QT.Q8_0:
        blocks = raw.reshape(n, -1, Q8_0_BYTES)
        scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32).reshape(n, -1)
        q = blocks[:, :, 2:].view(np.int8).reshape(n, -1)
        return DecodedRows(np.ascontiguousarray(q), scales, None, 32, 8)
    fmt = FORMATS.get(qtype)
    if fmt is None:
        raise ValueError(f"no exact MatMulNBits layout for {qtype.name}")
    block, size = GGML_QUANT_SIZES[qtype]
    k = raw.shape[1] // size * block
    chunk = max(1, _CHUNK_BYTES // (4 * k))
    parts = [_decode_chunk(raw[r : r + chunk], qtype, fmt, k) for r in range(0, n, chunk)]
    bias = None if fmt.offset is not None else np.concatenate([p[2] for p in parts])
    bits = 4 if fmt.qbits <= 4 else 8
    q, s = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return DecodedRows(q, s, bias, fmt.sub, bits)


def _decode_chunk(
    raw: np.ndarray, qtype: QT, fmt: BlockFormat, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    direct = _DIRECT.get(qtype)
    if direct is not None:
        q, s, bias = direct(raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]))
        n = raw.shape[0]
        return q.reshape(n, k), s.reshape(n, -1), None if bias is None else bias.reshape(n, -1)
    return _probe_chunk(raw, qtype, fmt, k)


def _probe_chunk(
    raw: np.ndarray, qtype: QT, fmt: BlockFormat, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Any type of :data:`FORMATS`, through ``gguf.quants.dequantize`` (see the module docstring)."""
    n, sub = raw.shape[0], fmt.sub
    _, size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, size)

    def probe(fill: int) -> np.ndarray:  # the first value of every sub-block with all q = fill bits
        b = blocks.copy()
        for a, z in fmt.q_bytes:
            b[:, a:z] = fill
        return quants.dequantize(b, qtype).reshape(n, k // sub, sub)[:, :, 0]

    v = quants.dequantize(blocks, qtype).reshape(n, k // sub, sub)
    v0 = probe(0)
    qmax = (1 << fmt.qbits) - 1
    half = 1 << (fmt.qbits - 1)
    if fmt.offset is not None:
        s = v0 / np.float32(-fmt.offset)  # exact: the offset is a power of two
        bias = None
        low = -fmt.offset
    else:
        s = (probe(0xFF) - v0) / np.float32(qmax)
        bias = v0 + s * np.float32(half)
        low = 0
    safe = np.where(s == 0, np.float32(1), s)[:, :, None]
    base = v0[:, :, None] if fmt.offset is None else np.float32(0)
    q = np.rint((v - base) / safe)
    q = np.clip(q, low, low + qmax) - (half if fmt.offset is None else 0)
    q = np.where(s[:, :, None] == 0, 0, q)
    return q.astype(np.int8).reshape(n, k), s.astype(np.float32), None if bias is None else bias.astype(np.float32)


# Direct decoders of the K-quants of Q4_K_M/Q5_K_M files (the common downloads): integer bit
# unpacking only, about 10x faster than the probes. Layouts: ggml-common.h ``block_q4_K``,
# ``block_q5_K`` (d, dmin, 12 bytes of 6-bit scales/mins, [qh], qs) and ``block_q6_K`` (ql, qh,
# int8 scales, d); gguf.quants' ``Q4_K.get_scale_min`` unpacks the 6-bit scales. Checked against
# ``gguf.quants.dequantize`` by the tests, like the probes.
def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)  # (nb, 1)


def _k_scales(blocks: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per 32-element sub-block scale ``d * sc`` and bias ``-dmin * m + half * scale``."""
    sc, m = quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))
    s = _f16(blocks, 0) * sc.astype(np.float32)
    return s, s * np.float32(half) - _f16(blocks, 2) * m.astype(np.float32)


def _low_high_nibbles(qs: np.ndarray) -> np.ndarray:
    """``qs`` uint8 ``(nb, 4*32)`` -> ``(nb, 256)``: each 32-byte group gives 32 low then 32 high nibbles."""
    g = qs.reshape(qs.shape[0], 4, 1, 32)
    return np.concatenate([g & 0x0F, g >> 4], axis=2).reshape(qs.shape[0], 256)


def _direct_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    s, bias = _k_scales(blocks, 8)
    q = _low_high_nibbles(blocks[:, 16:144]).view(np.int8) - np.int8(8)
    return q, s, bias


def _direct_q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    s, bias = _k_scales(blocks, 16)
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # bit j: sub-block j
    q = _low_high_nibbles(blocks[:, 48:176]) | ((qh & 1) << 4).reshape(-1, 256)
    return q.view(np.int8) - np.int8(16), s, bias


def _direct_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    nb = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(nb, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(nb, 2, 4, 32)  # per 128-half: 4 groups of 32
    qh = blocks[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((qh & 3) << 4)).reshape(nb, 256).view(np.int8) - np.int8(32)
    s = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return q, s, None


_DIRECT = {QT.Q4_K: _direct_q4_k, QT.Q5_K: _direct_q5_k, QT.Q6_K: _direct_q6_k}


def q4_0_to_nbits(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repack GGUF Q4_0 rows into MatMulNBits 4-bit layout (lossless; faster than :func:`decode_rows`).

    Q4_0 block: float16 ``d`` then 16 bytes ``qs``; byte ``j`` holds element ``j`` (low nibble) and
    element ``j + 16`` (high nibble); value ``d * (q - 8)``: the same nibbles, reordered.

    Args:
        raw: uint8 ``(N, K/32 * 18)``: GGUF Q4_0 rows.

    Returns:
        ``B`` uint8 ``(N, K/32, 16)`` and ``scales`` float32 ``(N * K/32,)``.
    """
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, Q4_0_BYTES)  # (N, nb, 18)
    scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32).reshape(-1)
    packed = np.empty((n, blocks.shape[1], 16), np.uint8)
    step = max(1, _CHUNK_BYTES // max(1, blocks.shape[1] * 64))  # rows per chunk: bounded temporaries
    for r in range(0, n, step):
        qs = blocks[r : r + step, :, 2:]  # (rows, nb, 16)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # (rows, nb, 32) in element order
        packed[r : r + step] = q[:, :, 0::2] | (q[:, :, 1::2] << 4)
    return packed, scales


def q8_0_to_nbits(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Repack GGUF Q8_0 rows (float16 ``d``, 32 int8 ``q``; value ``d * q``) into 8-bit layout, ``u = q + 128``.

    Args:
        raw: uint8 ``(N, K/32 * 34)``.

    Returns:
        ``B`` uint8 ``(N, K/32, 32)`` and ``scales`` float32 ``(N * K/32,)``.
    """
    return decode_rows(raw, QT.Q8_0).to_nbits()


def nbits_dequantize(
    b: np.ndarray, scales: np.ndarray, bits: int, block: int = 32, block_bias: np.ndarray | None = None
) -> np.ndarray:
    """Reference dequantization of MatMulNBits weights (plus block bias): float32 ``(N, K)``."""
    n, nb, _ = b.shape
    if bits == 4:
        q = np.empty((n, nb, block), np.int16)
        q[:, :, 0::2] = b & 0x0F
        q[:, :, 1::2] = b >> 4
        q -= 8
    else:
        q = b.astype(np.int16) - 128
    w = q * scales.reshape(n, nb, 1)
    if block_bias is not None:
        w = w + block_bias.reshape(n, nb, 1)
    return w.reshape(n, nb * block).astype(np.float32)
