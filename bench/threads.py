"""Decode tokens/s with 1 and 2 llama.cpp threads, idle and with one core kept busy, side by side.

    .venv/bin/python bench/threads.py [--model GGUF] [--tokens 64] [--rounds 2]

Anchor: llama-cpp-python's ``Llama`` evaluating one token at a time (greedy), with a fixed thread
count. Against it: potluck's batched engine (one stream) with the adaptive thread rule
(:mod:`potluck.inference.threads`), which should lose at most the busy core's share. The busy core
is a ``python -c 'while True: pass'`` process started for the "busy" rows and killed after. The
machine may be shared: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The quick brown fox"


def default_model() -> Path:
    out = subprocess.run([str(ROOT.parent / "shared" / "scripts" / "real-models")], capture_output=True, text=True)
    return Path(dict(line.split(maxsplit=1) for line in out.stdout.splitlines())["smollm2-q4_1"])


def llama_tps(path: Path, threads: int, n_tokens: int) -> float:
    """Greedy decode tokens/s of llama.cpp with ``threads`` threads (prompt prefill excluded)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(llm.tokenize(PROMPT.encode()))
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([token])  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    rate = n_tokens / (time.perf_counter() - t0)
    llm.close()
    return rate


def potluck_tps(path: Path, n_tokens: int, threads: int | None = None) -> tuple[float, int]:
    """Single-stream decode tokens/s of the batched engine (``threads`` None: adaptive) and its thread count."""
    from potluck.inference.batched_backend import BatchedLlamaCppBackend
    from potluck.routing.request import SamplingParams

    backend = BatchedLlamaCppBackend(path, "bench", n_ctx=512, n_slots=1, n_threads=threads)
    backend.load()
    params = SamplingParams(max_tokens=n_tokens + 1, temperature=0.0, seed=0)
    stream = backend.generate(PROMPT, params, threading.Event())
    next(stream)  # prefill and first token
    t0 = time.perf_counter()
    n = sum(1 for t in stream if t.token_id >= 0)
    rate = n / (time.perf_counter() - t0)
    threads = backend.engine.n_threads
    backend.close()
    return rate, threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = args.model or default_model()
    print(f"model {path.name}, {os.cpu_count()} cores, {args.tokens} tokens, best of {args.rounds}")
    head = f"{'load':6} {'llama.cpp 1t':>13} {'llama.cpp 2t':>13} {'potluck 2t':>11}"
    print(f"{head} {'potluck adaptive':>17} {'threads':>8}")
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            if hog is not None:
                time.sleep(1.0)  # let the load register in the CPU counters the rule reads
            one = max(llama_tps(path, 1, args.tokens) for _ in range(args.rounds))
            two = max(llama_tps(path, 2, args.tokens) for _ in range(args.rounds))
            fixed = max(potluck_tps(path, args.tokens, 2)[0] for _ in range(args.rounds))
            runs = [potluck_tps(path, args.tokens) for _ in range(args.rounds)]
            ours, chosen = max(runs)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        best = max(one, two)
        print(
            f"{'busy' if busy else 'idle':6} {one:13.1f} {two:13.1f} {fixed:11.1f} {ours:17.1f} {chosen:8d}  "
            f"potluck adaptive/best llama.cpp = {ours / best:.2f}x, llama.cpp 2t/1t = {two / one:.2f}x, "
            f"load {os.getloadavg()[0]:.2f}"
        )


if __name__ == "__main__":
    main()
