"""Exact MatMulNBits layouts of every block-quantized GGUF type, checked against gguf's own
dequantizer at every 32-element column split, and through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, quants
from gguf import GGMLQuantizationType as QT

from potluck.sharding.compute.onnx_ops import GraphBuilder, session_options
from potluck.sharding.format.extract import slice_linear
from potluck.sharding.format.nbits import FORMATS, decode_rows, nbits_dequantize

RNG = np.random.default_rng(11)
ROWS, COLS = 6, 512

# Byte offsets of each type's float16 fields (d, and dmin/m where the type has one): ggml-common.h.
F16_FIELDS = {
    QT.Q4_0: (0,),
    QT.Q8_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
}
TYPES = sorted(F16_FIELDS, key=lambda q: q.value)


def random_rows(qtype: QT, rows: int = ROWS, cols: int = COLS, zero_scale_block: bool = True) -> np.ndarray:
    """Valid random rows: random bytes, with finite float16 scales (one block's zero)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for i, off in enumerate(F16_FIELDS[qtype]):
        values = (RNG.random((rows, cols // block)) * (0.02 if i == 0 else 0.3)).astype(np.float16)
        raw[:, :, off : off + 2] = values.view(np.uint8).reshape(rows, cols // block, 2)
    if zero_scale_block:
        raw[0, 0, F16_FIELDS[qtype][0] : F16_FIELDS[qtype][0] + 2] = 0  # d = 0: every value is the minimum
    return raw.reshape(rows, -1)


def write_gguf(path: Path, qtype: QT, raw: np.ndarray) -> None:
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("t.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_decoding_reproduces_gguf_dequantize(qtype) -> None:
    raw = random_rows(qtype)
    d = decode_rows(raw, qtype)
    ref = quants.dequantize(raw, qtype)
    b, s = d.to_nbits()
    got = nbits_dequantize(b, s, d.bits, d.block, d.block_bias)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert d.bits == (4 if qtype in (QT.Q4_0, QT.Q4_1, QT.Q2_K, QT.Q3_K, QT.Q4_K) else 8)
    assert (d.block_bias is None) == (qtype in (QT.Q4_0, QT.Q8_0, QT.Q5_0, QT.Q3_K, QT.Q6_K))
    if qtype != QT.Q8_0:
        assert d.block == FORMATS[qtype].sub


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_every_legal_split_is_exact(tmp_path, qtype) -> None:
    """Rows and columns cut at every 32-element boundary (K-quant super-blocks are 256 wide)."""
    raw = random_rows(qtype)
    write_gguf(tmp_path / "t.gguf", qtype, raw)
    t = GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    ref = quants.dequantize(raw, qtype)
    for c in range(32, COLS, 32):
        for rows, cols in ((slice(1, 4), slice(0, c)), (slice(None), slice(c, COLS))):
            layout, arrays = slice_linear(t, rows, cols)
            bits = 4 if layout["kind"] == "q4" else 8
            got = nbits_dequantize(arrays["B"], arrays["scales"], bits, layout["block"], arrays.get("block_bias"))
            want = ref[rows, cols]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=f"{rows} {cols}")


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_onnx_runtime_computes_the_gguf_matmul(tmp_path, qtype, accuracy_level) -> None:
    raw = random_rows(qtype, rows=64, cols=256, zero_scale_block=False)
    write_gguf(tmp_path / "t.gguf", qtype, raw)
    layout, arrays = slice_linear(GGUFReader(str(tmp_path / "t.gguf")).tensors[0], slice(None), slice(None))
    gb = GraphBuilder(accuracy_level=accuracy_level)
    out = gb.linear("x", "lin", layout, {f"lin.{k}": v for k, v in arrays.items()})
    stage = gb.session([("x", 256)], [out], session_options(1, False))
    x = RNG.standard_normal((3, 256)).astype(np.float32)
    (y,) = stage.run(x)
    ref = x @ quants.dequantize(raw, qtype).T
    # level 0: exact up to float summation; level 4 quantizes x to int8 per block, as llama.cpp does
    tol = 1e-4 if accuracy_level == 0 else 0.03
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()
