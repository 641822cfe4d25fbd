"""Single node: potluck's HTTP API against llama-cpp-python called directly, same GGUF, one run.

For each model: start ``potluck node start`` as a real process, then alternate repetitions of
(a) a streamed completion through the API (SSE over loopback HTTP) and (b) the same completion
through ``llama_cpp.Llama.create_completion(stream=True)`` in this process. Both use greedy
decoding, the same prompt, the same thread count and max_tokens, and never run at the same time.

Metrics per repetition (medians are reported):
- TTFT: request sent -> first token's text received (ms);
- decode tokens/s: (completion tokens - 1) / (last token time - first token time).

Usage: python bench/single_node.py [--model PATH ...] [--reps 5] [--max-tokens 200] [--threads 2]
Goal: API >= 0.97x direct for decode tokens/s.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from potluck.inference.gguf_file import inspect_gguf  # noqa: E402
from tests.e2e.procs import NodeProcess, offline_env  # noqa: E402

DEFAULT_MODELS = [
    REPO.parent / "shared/models/tinyshakespeare-q4_0.gguf",
    REPO.parent / "shared/models/tinyshakespeare-f16.gguf",
]
PROMPT = "ROMEO:\nBut soft, what light"


def api_run(port: int, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion through the API: (ttft_s, decode_tok_s, n_tokens)."""
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    n = 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            n = event["usage"]["completion_tokens"]
        if event["choices"] and event["choices"][0]["text"]:
            now = time.perf_counter()
            first = first or now
            last = now
    conn.close()
    assert first is not None and last is not None and n > 1
    return first - t0, (n - 1) / max(last - first, 1e-9), n


def direct_run(llm, prompt: str, max_tokens: int) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """One streamed completion through llama-cpp-python directly."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
        n += 1
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:
            first = first or now
            last = now
    assert first is not None and last is not None and n > 1
    return first - t0, (n - 1) / max(last - first, 1e-9), n


def bench_model(path: Path, reps: int, max_tokens: int, threads: int, console: Console) -> dict[str, float]:
    from llama_cpp import Llama

    with tempfile.TemporaryDirectory() as home:
        env = offline_env(Path(home), POTLUCK_N_THREADS=str(threads))
        node = NodeProcess(Path(home), "--model", str(path), env=env)
        try:
            node.wait_ready()
            n_ctx = min(2048, inspect_gguf(path).context_length or 2048)  # what the node uses
            llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
            model_id = path.stem
            api_run(node.port, model_id, PROMPT, 8)  # warm-up both paths
            direct_run(llm, PROMPT, 8)
            api, direct = [], []
            for rep in range(reps):
                # A different first token each repetition: neither path can reuse a cached prompt.
                prompt = f"{rep}. {PROMPT}"
                api.append(api_run(node.port, model_id, prompt, max_tokens))
                direct.append(direct_run(llm, prompt, max_tokens))
            llm.close()
        finally:
            node.stop()
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    return {
        "api_ttft_ms": med(api, 0) * 1e3,
        "direct_ttft_ms": med(direct, 0) * 1e3,
        "api_tok_s": med(api, 1),
        "direct_tok_s": med(direct, 1),
        "tokens": med(api, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", type=Path, help="GGUF file (repeatable)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=200, help="per request (the fixtures' context is 256)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    console = Console(width=150)
    table = Table(title=f"potluck API vs llama-cpp-python direct ({args.reps} reps, medians)")
    for col in ("model", "tokens", "direct tok/s", "API tok/s", "ratio", "direct TTFT ms", "API TTFT ms", "ratio"):
        table.add_column(col, justify="right")
    for path in args.model or DEFAULT_MODELS:
        console.print(f"benchmarking {path.name} ...")
        r = bench_model(path, args.reps, args.max_tokens, args.threads, console)
        table.add_row(
            path.stem,
            f"{r['tokens']:.0f}",
            f"{r['direct_tok_s']:.0f}",
            f"{r['api_tok_s']:.0f}",
            f"{r['api_tok_s'] / r['direct_tok_s']:.3f}x",
            f"{r['direct_ttft_ms']:.1f}",
            f"{r['api_ttft_ms']:.1f}",
            f"{r['api_ttft_ms'] / r['direct_ttft_ms']:.2f}x",
        )
    console.print(table)
    console.print("decode ratio = API / direct (goal >= 0.97); TTFT ratio = API / direct (lower is better)")


if __name__ == "__main__":
    main()
