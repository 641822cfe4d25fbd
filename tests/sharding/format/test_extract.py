"""Shard extraction: lossless Q4_0/Q8_0 repacking, slicing, the lossy fallback for IQ types, shard files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, quants
from gguf import GGMLQuantizationType as QT

from potluck.errors import ModelFileError
from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.compute.onnx_ops import GraphBuilder, session_options
from potluck.sharding.format.extract import extract_shard, fuse_linears, slice_linear
from potluck.sharding.format.gguf_tensors import open_gguf, tensor_map
from potluck.sharding.format.nbits import nbits_dequantize, q4_0_to_nbits, q8_0_to_nbits
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.format.shard_file import read_shard, write_shard
from potluck.sharding.orchestration.group import plan_for

RNG = np.random.default_rng(7)


@pytest.mark.parametrize(("qtype", "repack", "bits"), [(QT.Q4_0, q4_0_to_nbits, 4), (QT.Q8_0, q8_0_to_nbits, 8)])
def test_repack_is_lossless_against_gguf_dequantize(qtype, repack, bits) -> None:
    w = RNG.standard_normal((48, 256)).astype(np.float32)
    raw = quants.quantize(w, qtype)
    b, scales = repack(raw)
    assert b.shape == (48, 256 // 32, 32 * bits // 8) and scales.shape == (48 * 8,)
    np.testing.assert_array_equal(nbits_dequantize(b, scales, bits), quants.dequantize(raw, qtype))


def test_q4_0_nibble_order_is_matmulnbits_low_nibble_first() -> None:
    # one block with elements 0..15 -> q = 8 + (i % 8) - 4 ... build by hand from the GGUF layout
    q = (np.arange(32) % 16).astype(np.uint8)  # element i has quant value i % 16
    block = np.zeros(18, np.uint8)
    block[:2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    block[2:] = q[:16] | (q[16:] << 4)  # GGUF: byte j = element j (low), element j+16 (high)
    b, _ = q4_0_to_nbits(block.reshape(1, 18))
    assert b[0, 0, 0] == (q[0] | (q[1] << 4))  # MatMulNBits: byte i = element 2i (low), 2i+1 (high)
    assert b[0, 0, 15] == (q[30] | (q[31] << 4))


@pytest.mark.parametrize("kind", ["q4_0", "q8_0", "f16", "f32"])
def test_slices_of_fixture_tensors_match_dequantized_rows_and_columns(model_path, kind) -> None:
    t = tensor_map(open_gguf(model_path(kind)))["blk.1.ffn_down.weight"]  # (256 out, 768 in)
    full = quants.dequantize(t.data, QT(t.tensor_type)).reshape(256, 768)
    layout, arrays = slice_linear(t, slice(None), slice(96, 416))
    assert (layout["n"], layout["k"]) == (256, 320)
    if "B" in arrays:
        got = nbits_dequantize(arrays["B"], arrays["scales"], 4 if layout["kind"] == "q4" else 8)
    else:
        got = arrays["W"].astype(np.float32)
    np.testing.assert_array_equal(got, full[:, 96:416])
    with pytest.raises(ModelFileError, match="block") if kind.startswith("q") else _nothing():
        slice_linear(t, slice(None), slice(0, 40))


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_matmulnbits_matches_dequantized_matmul(kind, accuracy_level) -> None:
    w = RNG.standard_normal((64, 256)).astype(np.float32)
    raw = quants.quantize(w, QT.Q4_0 if kind == "q4" else QT.Q8_0)
    b, s = (q4_0_to_nbits if kind == "q4" else q8_0_to_nbits)(raw)
    gb = GraphBuilder(accuracy_level=accuracy_level)
    out = gb.linear("x", "lin", {"kind": kind, "n": 64, "k": 256}, {"lin.B": b, "lin.scales": s})
    stage = gb.session([("x", 256)], [out], session_options(1, False))
    x = RNG.standard_normal((3, 256)).astype(np.float32)
    (y,) = stage.run(x)
    ref = x @ quants.dequantize(raw, QT.Q4_0 if kind == "q4" else QT.Q8_0).T
    # level 0 is exact up to float summation; level 4 quantizes x to int8 per block, as llama.cpp does
    tol = 1e-4 if accuracy_level == 0 else 0.02
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()


def test_types_without_an_exact_layout_are_requantized_with_a_warning(tmp_path, caplog) -> None:
    """IQ4_NL (a non-linear 4-bit codebook) has no MatMulNBits layout: re-quantized to Q4_0."""
    qtype = QT.IQ4_NL
    block, size = GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, (8, 512 // block, size), dtype=np.uint8)
    raw[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    path = tmp_path / "iq.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("t.weight", raw.reshape(8, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = GGUFReader(str(path)).tensors[0]
    layout, arrays = slice_linear(t, slice(2, 6), slice(64, 320))
    assert layout["kind"] == "q4" and "re-quantized to Q4_0 (lossy)" in caplog.text
    ref = quants.dequantize(t.data, qtype).reshape(8, 512)[2:6, 64:320]
    got = nbits_dequantize(arrays["B"], arrays["scales"], 4)
    rel = np.sqrt(((got - ref) ** 2).mean() / (ref**2).mean())
    assert 0 < rel < 0.2


def test_shard_file_round_trip_and_memory_map(tmp_path) -> None:
    tensors = {
        "a": RNG.standard_normal((3, 5)).astype(np.float32),
        "b": np.arange(7, dtype=np.uint8),
        "c": np.zeros((0, 4), np.float16),
    }
    path = tmp_path / "x.pshard"
    write_shard(path, {"rank": 2, "nested": {"k": [1, 2]}}, tensors)
    shard = read_shard(path)
    assert shard.meta == {"rank": 2, "nested": {"k": [1, 2]}}
    for name, arr in tensors.items():
        np.testing.assert_array_equal(shard.tensors[name], arr)
        assert shard.tensors[name].dtype == arr.dtype
    assert isinstance(shard.tensors["a"].base, np.memmap) or not shard.tensors["a"].flags.writeable


def test_corrupt_shard_files_are_rejected(tmp_path) -> None:
    path = tmp_path / "x.pshard"
    write_shard(path, {"rank": 0}, {"a": np.ones((64, 64), np.float32)})
    data = path.read_bytes()
    (tmp_path / "trunc").write_bytes(data[:-100])
    (tmp_path / "magic").write_bytes(b"NOTSHARD" + data[8:])
    (tmp_path / "header").write_bytes(data[:24] + b"\xc1" * 40 + data[64:])
    (tmp_path / "empty").write_bytes(b"")
    for name, why in [("trunc", "truncated"), ("magic", "not a potluck shard"), ("header", None), ("empty", None)]:
        with pytest.raises(ModelFileError, match=why):
            read_shard(tmp_path / name)
    with pytest.raises(ModelFileError):
        read_shard(tmp_path / "missing")


def test_qkv_and_gate_up_are_stacked_and_mixed_kinds_are_not() -> None:
    t = {f"{n}.B": RNG.integers(0, 256, (r, 8, 16), dtype=np.uint8) for n, r in (("q", 64), ("k", 32), ("v", 32))}
    t |= {f"{n}.scales": RNG.random(r * 8).astype(np.float32) for n, r in (("q", 64), ("k", 32), ("v", 32))}
    layouts = {n: {"kind": "q4", "n": r, "k": 256} for n, r in (("q", 64), ("k", 32), ("v", 32))}
    linears, tensors = dict(layouts), dict(t)
    fuse_linears(linears, tensors, "qkv", ["q", "k", "v"])
    assert linears == {"qkv": {"kind": "q4", "n": 128, "k": 256, "parts": [64, 32, 32]}}
    np.testing.assert_array_equal(tensors["qkv.B"], np.concatenate([t["q.B"], t["k.B"], t["v.B"]]))
    np.testing.assert_array_equal(tensors["qkv.scales"][64 * 8 : 96 * 8], t["k.scales"])
    mixed = dict(layouts) | {"v": {"kind": "q8", "n": 32, "k": 256}}
    tensors = dict(t)
    fuse_linears(mixed, tensors, "qkv", ["q", "k", "v"])
    assert "qkv" not in mixed and tensors.keys() == t.keys()


def test_stacked_and_separate_linears_give_the_same_logits(model_path) -> None:
    """Shards cached before stacking (separate Q/K/V, gate/up) still run, with the same result."""
    path = model_path("q4_0")
    reader = open_gguf(path)
    plan = plan_for(reader, path, [NodeCapability("n0", 1 << 30, 1.0)], 64)
    stacked = extract_shard(reader, plan, 0)
    separate = extract_shard(reader, plan, 0)
    for layer in range(int(separate.meta["config"]["n_layers"])):
        p = f"blk.{layer}."
        for fused, parts in (("attn_qkv", ("attn_q", "attn_k", "attn_v")), ("ffn_gate_up", ("ffn_gate", "ffn_up"))):
            layout = separate.meta["linears"].pop(p + fused)
            rows = np.cumsum([0, *layout["parts"]])
            blocks = layout["k"] // 32
            for name, n, a, b in zip(parts, layout["parts"], rows[:-1], rows[1:], strict=True):
                separate.meta["linears"][p + name] = {"kind": layout["kind"], "n": n, "k": layout["k"]}
                separate.tensors[f"{p}{name}.B"] = separate.tensors[f"{p}{fused}.B"][a:b]
                separate.tensors[f"{p}{name}.scales"] = separate.tensors[f"{p}{fused}.scales"][a * blocks : b * blocks]
    ids = list(range(1, 17))
    logits = [
        TPMaster(RankCompute.from_shard(s, EngineOptions(n_ctx=64, threads=1)), s, None).forward(ids, 0, True)
        for s in (stacked, separate)
    ]
    np.testing.assert_allclose(logits[0], logits[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 1])
def test_streamed_extraction_writes_the_in_memory_shard(model_path, tmp_path, rank) -> None:
    from potluck.sharding.format.extract import extract_shard_to

    path = model_path("q4_0")
    reader = open_gguf(path)
    plan = plan_for(reader, path, [NodeCapability(f"n{i}", 1 << 30, 1.0) for i in range(2)], 64)
    in_memory = extract_shard(reader, plan, rank)
    size = extract_shard_to(reader, plan, rank, tmp_path / "s.pshard")
    streamed = read_shard(tmp_path / "s.pshard")
    assert size == (tmp_path / "s.pshard").stat().st_size and streamed.path == tmp_path / "s.pshard"
    assert streamed.meta == in_memory.meta
    assert streamed.tensors.keys() == in_memory.tensors.keys()
    for name, arr in in_memory.tensors.items():
        np.testing.assert_array_equal(streamed.tensors[name], arr)


def test_a_streamed_header_is_padded_to_its_slot_or_refused(tmp_path) -> None:
    from potluck.sharding.format.shard_file import ShardWriter

    arrays = {f"t{i}": RNG.standard_normal((3, i + 1)).astype(np.float32) for i in range(5)}
    for slot in (300, 1000, 70000):
        with ShardWriter(tmp_path / f"s{slot}.pshard", header_bytes=slot) as w:
            for name, arr in arrays.items():
                w.add(name, arr)
            w.finish({"rank": 0})
        back = read_shard(tmp_path / f"s{slot}.pshard")
        assert back.meta == {"rank": 0}
        for name, arr in arrays.items():
            np.testing.assert_array_equal(back.tensors[name], arr)
    with ShardWriter(tmp_path / "small.pshard", header_bytes=40) as w:
        w.add("t", arrays["t0"])
        with pytest.raises(ValueError, match="does not fit"):
            w.finish({"rank": 0, "big": "x" * 100})
    assert not list(tmp_path.glob(".small*"))  # the temp file is gone
    assert not (tmp_path / "small.pshard").exists()
