"""Shard extraction time vs a sequential read of the same GGUF, side by side.

    .venv/bin/python bench/tp_extract.py [--nodes 1,2] [--dir DIR] [--model GGUF]

Anchor: reading the whole file sequentially in 8 MiB chunks (page cache warm, as extraction's is:
the read runs first and again last). Against it: cutting every rank's shard of an N-rank plan
(:func:`potluck.sharding.format.extract.extract_shard`, in this process, one rank after another),
which decodes each quantized tensor into MatMulNBits layout without re-quantizing. Without
``--model`` the file is the 1.1B TinyLlama-geometry model of ``bench/tp_decode.py`` re-quantized by
llama.cpp to Q4_K_M (Q4_K, Q6_K and, for its FFN-down and V rows, the types llama.cpp picks),
built once and cached in ``DIR``. Prints seconds, MB/s of GGUF bytes and the ratio to the read.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


def build_q4_k_m(source: Path, out: Path) -> None:
    """Re-quantize ``source`` to Q4_K_M with llama.cpp (``llama_model_quantize``, requantize allowed)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    tmp.replace(out)


def extract_all(path: Path, n: int) -> float:
    from potluck.sharding.format.extract import extract_shard
    from potluck.sharding.format.gguf_tensors import open_gguf
    from potluck.sharding.format.plan import NodeCapability
    from potluck.sharding.orchestration.group import plan_for

    t0 = time.perf_counter()
    reader = open_gguf(path)
    plan = plan_for(reader, path, [NodeCapability(f"local-{r}", 64 << 30, 1.0) for r in range(n)], 256)
    for rank in range(n):
        extract_shard(reader, plan, rank)
    return time.perf_counter() - t0


def main() -> None:
    from gguf import GGMLQuantizationType

    from bench.tp_decode import build_model
    from potluck.config import default_cache_dir
    from potluck.sharding.format.gguf_tensors import open_gguf
    from potluck.sharding.orchestration.forecast import measure_disk_bandwidth

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2", help="comma-separated rank counts")
    ap.add_argument("--dir", type=Path, default=default_cache_dir() / "bench")
    ap.add_argument("--model", type=Path, default=None, help="GGUF to cut (default: the 1.1B Q4_K_M)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        args.dir.mkdir(parents=True, exist_ok=True)
        source = args.dir / "bench-llama-1.1b-random-q4_0.gguf"
        model = args.dir / "bench-llama-1.1b-random-q4_k_m.gguf"
        if not source.is_file():
            build_model(source)
        if not model.is_file():
            t0 = time.perf_counter()
            build_q4_k_m(source, model)
            print(f"built {model} in {time.perf_counter() - t0:.0f} s")
    size = model.stat().st_size
    types = Counter(GGMLQuantizationType(t.tensor_type).name for t in open_gguf(model).tensors)
    print(f"{model.name}: {size / 1e6:.0f} MB, tensor types {dict(types)}")
    reads = [size / measure_disk_bandwidth(model, size, cold=False)]
    rows = []
    for n in (int(x) for x in args.nodes.split(",")):
        rows.append((n, extract_all(model, n)))
    reads.append(size / measure_disk_bandwidth(model, size, cold=False))
    read = min(reads)
    print(f"sequential read (warm): {read:.2f} s, {size / read / 1e6:.0f} MB/s")
    print(f"{'N':>2} {'extract s':>9} {'MB/s':>6} {'vs read':>8}")
    for n, secs in rows:
        print(f"{n:>2} {secs:9.2f} {size / secs / 1e6:6.0f} {secs / read:7.1f}x")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
