"""Aggregate decode tokens/s with 1, 4 and 8 concurrent streams: potluck vs llama_cpp.server.

    .venv/bin/python bench/concurrency.py [--streams 1,4,8] [--tokens 32] [--threads 1] [--models 1b,smollm2]

Both servers run as real processes, one after the other on the same model in one run:
``potluck node start`` (continuous batching, ``--parallel`` = the largest stream count) and
llama-cpp-python's ``llama_cpp.server`` (no batching: concurrent requests wait for one lock), the
anchor. Its dependencies are installed without rebuilding llama-cpp-python:
``pip install fastapi uvicorn sse-starlette starlette-context``.

Models: a 1.1B TinyLlama-geometry Q4_0 GGUF with random weights (built once by ``bench/tp_decode.py``'s
generator, cached under ``<potluck cache>/bench``) and SmolLM2-135M-Instruct Q4_1
(``../shared/scripts/real-models``). Each round sends N streaming ``/v1/completions`` requests at
once (greedy, ``max_tokens`` each, prompts no earlier request began with) and reports aggregate
decode tokens/s (tokens after each stream's first, from the first first-token to the end of the
round), end-to-end tokens/s (all tokens / wall time of the round), per-stream decode tokens/s
(tokens after the first / time after the first) and time to first token p50/p95. Both servers get
the same thread count. Goal: potluck's aggregate at 8 streams >= 3x its single-stream aggregate on
the 1.1B model. The machine may be shared: load averages are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The history of the city begins",
    "In a quiet village by the sea",
    "The recipe calls for",
    "Scientists have discovered",
    "Once upon a time",
    "The meeting was scheduled for",
    "Our journey started when",
    "The main advantage of",
]


@dataclass
class Stream:
    ttft_s: float
    total_s: float
    tokens: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], within: float = 300.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {within} s")


def start_potluck(model: Path, port: int, threads: int, slots: int, home: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        POTLUCK_DATA_DIR=str(home / "data"),
        POTLUCK_CACHE_DIR=str(home / "cache"),
        XDG_CONFIG_HOME=str(home / "config"),
        POTLUCK_P2P_ENABLED="false",
        HF_HUB_OFFLINE="1",
    )
    cmd = [str(Path(sys.executable).parent / "potluck"), "node", "start", "--model", str(model)]
    cmd += ["--port", str(port), "--parallel", str(slots), "--threads", str(threads), "--max-queue", "64"]
    cmd += ["--ctx", "512", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
    return proc


def start_llama_server(model: Path, port: int, threads: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port", str(port)]
    cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "512", "--verbose", "false"]
    cmd += ["--interrupt_requests", "false"]  # queue concurrent requests instead of cutting the running one
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/v1/models", proc)
    return proc


async def one_stream(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> Stream:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage: int | None = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices", [])):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return Stream(ttft if ttft is not None else total, total, usage if usage is not None else chunks)


def prompts(key: str, tag: int, n: int) -> list[str]:
    """``n`` prompts no earlier request began with (no KV prefix reuse on either server). The 1.1B
    model's vocabulary has no merges (text becomes byte tokens): 8 random letters, about 12 tokens."""
    rng = random.Random(tag)
    if key == "1b":
        return ["".join(rng.choice(string.ascii_lowercase) for _ in range(8)) for _ in range(n)]
    return [f"{rng.randrange(10**6)}. {PROMPTS[i % len(PROMPTS)]}" for i in range(n)]


async def round_of(url: str, model: str, texts: list[str], max_tokens: int) -> tuple[float, list[Stream]]:
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(session, url, model, p, max_tokens) for p in texts))
        wall = time.perf_counter() - t0
    return wall, list(streams)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def measure(name: str, key: str, url: str, model: str, counts: list[int], max_tokens: int) -> dict[int, float]:
    """Aggregate decode tokens/s per stream count: tokens after each stream's first, over the time
    from the first first-token to the end of the round (prefill before it excluded)."""
    asyncio.run(round_of(url, model, prompts(key, 0, 1), 4))  # warm-up
    agg: dict[int, float] = {}
    for n in counts:
        wall, streams = asyncio.run(round_of(url, model, prompts(key, n, n), max_tokens))
        tokens = sum(s.tokens for s in streams)
        first = min(s.ttft_s for s in streams)
        agg[n] = sum(max(0, s.tokens - 1) for s in streams) / (wall - first)
        per_stream = [(s.tokens - 1) / (s.total_s - s.ttft_s) for s in streams if s.tokens > 1 and s.total_s > s.ttft_s]
        ttfts = [s.ttft_s for s in streams]
        print(
            f"  {name:18} N={n}: decode {agg[n]:7.2f} tok/s, end-to-end {tokens / wall:7.2f} tok/s "
            f"({tokens} tokens in {wall:6.1f} s), "
            f"per stream {statistics.median(per_stream) if per_stream else 0:6.2f} tok/s median, "
            f"TTFT p50 {pct(ttfts, 0.5):6.2f} s p95 {pct(ttfts, 0.95):6.2f} s   load {os.getloadavg()[0]:.2f}"
        )
    return agg


def model_paths(which: list[str], cache: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    if "1b" in which:
        from bench.tp_decode import build_model

        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "bench-llama-1.1b-random-q4_0.gguf"
        if not path.is_file():
            build_model(path)
        paths["1b"] = path
    if "smollm2" in which:
        out = subprocess.run([str(ROOT.parent / "shared" / "scripts" / "real-models")], capture_output=True, text=True)
        paths["smollm2"] = Path(dict(line.split(maxsplit=1) for line in out.stdout.splitlines())["smollm2-q4_1"])
    return paths


def main() -> None:
    from potluck.config import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per stream")
    ap.add_argument("--threads", type=int, default=1, help="compute threads, the same for both servers")
    ap.add_argument("--models", default="1b,smollm2")
    ap.add_argument("--dir", type=Path, default=default_cache_dir() / "bench")
    args = ap.parse_args()
    counts = [int(x) for x in args.streams.split(",")]
    print(f"{os.cpu_count()} cores, {args.threads} threads each, load average {os.getloadavg()[0]:.2f}")
    summary = []
    for key, path in model_paths(args.models.split(","), args.dir).items():
        print(f"{key}: {path.name}")
        with tempfile.TemporaryDirectory(prefix="potluck-bench-") as home:
            port = free_port()
            proc = start_potluck(path, port, args.threads, max(counts), Path(home))
            try:
                ours = measure("potluck", key, f"http://127.0.0.1:{port}", path.stem, counts, args.tokens)
            finally:
                proc.terminate()
                proc.wait(60)
        port = free_port()
        proc = start_llama_server(path, port, args.threads)
        try:
            theirs = measure("llama_cpp.server", key, f"http://127.0.0.1:{port}", str(path), counts, args.tokens)
        finally:
            proc.terminate()
            proc.wait(60)
        summary.append((key, ours, theirs))
    print()
    print("aggregate decode tokens/s:")
    head = f"{'model':8} {'N':>2} {'potluck':>9} {'llama srv':>9} {'potluck/srv':>11} {'potluck N/1':>11}"
    print(f"{head} {'srv N/1':>8}")
    for key, ours, theirs in summary:
        for n in counts:
            print(
                f"{key:8} {n:>2} {ours[n]:9.2f} {theirs[n]:9.2f} {ours[n] / theirs[n]:10.2f}x "
                f"{ours[n] / ours[counts[0]]:10.2f}x {theirs[n] / theirs[counts[0]]:7.2f}x"
            )


if __name__ == "__main__":
    main()
