"""Tensor-parallel decode speed vs llama.cpp on a ~1B-parameter Llama-geometry Q4_0 GGUF.

    .venv/bin/python bench/tp_decode.py [--tokens 32] [--nodes 1,2,4] [--dir DIR] [--typing q4_0|q4_k_m]
        [--attention exact|fused] [--rounds R]

Builds (once, cached in ``DIR``, default ``<potluck cache>/bench``) a GGUF with TinyLlama-1.1B's
geometry (hidden 2048, 22 layers, FFN 5632, 32 heads, 4 KV heads, vocab 32000) and random Q4_0
weights (blocks quantized with ``gguf.quants`` from Gaussian rows, then drawn at random per tensor;
``--typing q4_k_m``: the same model re-quantized by llama.cpp to Q4_K_M), then in one run measures
greedy decode tokens/s of llama.cpp (llama-cpp-python, 2 threads) and of
potluck's TP engine with N = 1, 2, 4 ranks as real processes over the TCP star on this machine.
For every rank it reports compute time and all-reduce (communication + waiting) time per token,
so the cost model can be checked. On a 2-core machine N > 2 ranks share cores, so N = 4 measures
overheads, not a speed-up. Goals: N = 1 >= 1.0x llama.cpp, N = 2 >= 0.85x. The machine is shared: the load
average is printed at the start and the end, and ``--rounds`` repeats the measurements.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS, VOCAB, CTX = 2048, 22, 5632, 32, 4, 32000, 2048
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]


def _q4_rows(rng: np.random.Generator, pool: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` random rows of Q4_0 bytes drawn from ``pool`` (each row a real gguf.quants row)."""
    return pool[rng.integers(0, pool.shape[0], rows)]


def build_model(path: Path) -> None:
    """Write the random-weight 1.1B Q4_0 GGUF (about 640 MB)."""
    rng = np.random.default_rng(0)
    pools = {
        k: quants.quantize(rng.normal(0, 0.02, (256, k)).astype(np.float32), GGMLQuantizationType.Q4_0)
        for k in (HIDDEN, FFN)
    }
    tmp = path.with_suffix(".tmp")
    w = GGUFWriter(str(tmp), "llama")
    w.add_name("potluck-bench-1.1B-random-q4_0")
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(2)  # MOSTLY_Q4_0
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(VOCAB - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(VOCAB - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    q4 = GGMLQuantizationType.Q4_0
    hd = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", _q4_rows(rng, pools[HIDDEN], VOCAB), raw_dtype=q4)
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(p + "attn_q.weight", _q4_rows(rng, pools[HIDDEN], HIDDEN), raw_dtype=q4)
        w.add_tensor(p + "attn_k.weight", _q4_rows(rng, pools[HIDDEN], KV_HEADS * hd), raw_dtype=q4)
        w.add_tensor(p + "attn_v.weight", _q4_rows(rng, pools[HIDDEN], KV_HEADS * hd), raw_dtype=q4)
        w.add_tensor(p + "attn_output.weight", _q4_rows(rng, pools[HIDDEN], HIDDEN), raw_dtype=q4)
        w.add_tensor(p + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(p + "ffn_gate.weight", _q4_rows(rng, pools[HIDDEN], FFN), raw_dtype=q4)
        w.add_tensor(p + "ffn_up.weight", _q4_rows(rng, pools[HIDDEN], FFN), raw_dtype=q4)
        w.add_tensor(p + "ffn_down.weight", _q4_rows(rng, pools[FFN], HIDDEN), raw_dtype=q4)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output.weight", _q4_rows(rng, pools[HIDDEN], VOCAB), raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    tmp.replace(path)


def bench_llama_cpp(path: Path, n_tokens: int) -> float:
    """Greedy decode tokens/s of llama.cpp (2 threads), after a prompt prefill."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_batch=64, n_threads=2, n_threads_batch=2, verbose=False)
    llm.eval(PROMPT)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([token])  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    rate = n_tokens / (time.perf_counter() - t0)
    llm.close()
    return rate


def bench_potluck(path: Path, n: int, n_tokens: int, shard_dir: Path, attention: str = "exact") -> tuple[float, list]:  # type: ignore[type-arg]
    """Greedy decode tokens/s of the TP engine with ``n`` ranks, and per-rank stats."""
    from potluck.sharding.compute.engine import EngineOptions
    from potluck.sharding.format.plan import NodeCapability
    from potluck.sharding.orchestration.launch import ProcessGroup

    nodes = [NodeCapability(f"local-{r}", 8 << 30, 1.0) for r in range(n)]
    with ProcessGroup(path, nodes, EngineOptions(n_ctx=256, attention=attention), shard_dir, timeout_s=60.0) as group:
        master = group.master
        logits = master.forward(PROMPT, 0)
        pos = len(PROMPT)
        token = int(np.argmax(logits[-1]))
        master.forward([token], pos)  # warm-up
        pos += 1
        master.reset_stats()
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            token = int(np.argmax(master.forward([token], pos)[-1]))
            pos += 1
        rate = n_tokens / (time.perf_counter() - t0)
        stats = master.gather_stats()
    return rate, stats


def main() -> None:
    from potluck.config import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per configuration")
    ap.add_argument("--nodes", default="1,2,4", help="comma-separated rank counts")
    ap.add_argument("--dir", type=Path, default=default_cache_dir() / "bench")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole N list (noisy shared machines)")
    ap.add_argument(
        "--typing",
        choices=("q4_0", "q4_k_m"),
        default="q4_0",
        help="q4_k_m: the same model re-quantized by llama.cpp to Q4_K_M (bench/tp_extract.py's file)",
    )
    ap.add_argument("--attention", choices=("exact", "fused"), default="exact", help="the engine's attention block")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / "bench-llama-1.1b-random-q4_0.gguf"
    if not model.is_file():
        t0 = time.perf_counter()
        build_model(model)
        print(f"built {model} ({model.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    if args.typing == "q4_k_m":
        from bench.tp_extract import build_q4_k_m

        source, model = model, args.dir / "bench-llama-1.1b-random-q4_k_m.gguf"
        if not model.is_file():
            build_q4_k_m(source, model)
    print(f"model: {model.name}")
    # The machine is shared: the anchor is measured before, between and after the TP runs; the
    # ratio uses the median, and the best anchor run is printed too (most conservative ratio).
    # Each TP run's "vs adjacent" ratio uses the mean of the anchor runs just before and after it.
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    anchor = [bench_llama_cpp(model, args.tokens)]
    print(f"llama.cpp (2 threads): {anchor[-1]:.2f} tok/s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="potluck-bench-shards-") as shard_dir:
        for _ in range(args.rounds):
            for n in (int(x) for x in args.nodes.split(",")):
                rate, stats = bench_potluck(model, n, args.tokens, Path(shard_dir), args.attention)
                print(f"potluck TP N={n}: {rate:.2f} tok/s")
                anchor.append(bench_llama_cpp(model, args.tokens))
                print(f"llama.cpp (2 threads): {anchor[-1]:.2f} tok/s")
                rows.append((n, rate, stats, (anchor[-2] + anchor[-1]) / 2))
    ref = statistics.median(anchor)
    print(f"anchor: median {ref:.2f} tok/s, best {max(anchor):.2f} tok/s over {len(anchor)} runs")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    head = f"{'N':>2} {'tok/s':>7} {'vs adjacent':>11} {'vs median':>9} {'vs best':>7}"
    print(f"{head}   per rank: compute | all-reduce, ms/token")
    for n, rate, stats, adjacent in rows:
        per_rank = "  ".join(
            f"r{r}: {s.compute_s / max(s.steps, 1) * 1e3:6.1f} | {s.comm_s / max(s.steps, 1) * 1e3:5.1f}"
            for r, s in enumerate(stats)
        )
        ratios = f"{rate / adjacent:10.2f}x {rate / ref:8.2f}x {rate / max(anchor):6.2f}x"
        print(f"{n:>2} {rate:7.2f} {ratios}   {per_rank}")


if __name__ == "__main__":
    main()
