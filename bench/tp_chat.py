"""Greedy chat through a tensor-parallel group vs llama.cpp on the same GGUF: tokens before divergence.

    .venv/bin/python bench/tp_chat.py [--model GGUF ...] [--max-tokens 32] [--prompts 20]

For each model (default: the two real models of ``../shared/scripts/real-models``, SmolLM2-135M
Q4_1 and Gemma 3 270M Q4_K_M) three real ``potluck node start`` processes on loopback:

- the anchor: a node serving the GGUF with llama.cpp (the default backend);
- a worker node, and a master started with ``--tensor-parallel 2`` that forms a 2-rank TP group
  over it (the model's slices are cut from the GGUF exactly, see ``potluck.sharding.format.nbits``).

Both answer the same 20 chat prompts through ``/v1/chat/completions`` at temperature 0 (the GGUF's
chat template, ``max_tokens`` 32). Each answer is tokenized with the GGUF's tokenizer and the bench
prints, per prompt, how many leading tokens agree (identical answers count as ``max_tokens``: they
do not diverge within the budget, even when they end early), then the median and the count of
identical answers. Both engines quantize activations to int8 in their own way (llama.cpp: Q8_0/Q8_K blocks;
ONNX Runtime: per 16/32-block), so near-ties can flip; the median shows how long answers stay
identical. Also printed: each side's decode tokens/s over the whole run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.procs import NodeProcess, free_port, get_json, offline_env, post_json  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are in a leap year?",
    "Explain what a CPU does in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "What language is spoken in Brazil?",
    "Why is the sky blue?",
    "List the planets of the solar system.",
    "What does DNA stand for?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
    "What is photosynthesis?",
    "How do I make a cup of tea?",
    "What is the largest ocean on Earth?",
    "Describe a rainbow to a child.",
    "What is the square root of 81?",
]


def real_models() -> list[Path]:
    out = subprocess.run([str(ROOT.parent / "shared" / "scripts" / "real-models")], capture_output=True, text=True)
    return [Path(line.split(maxsplit=1)[1]) for line in out.stdout.splitlines() if line.strip()]


def chat(node: NodeProcess, model: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    """The answer text, its completion tokens and the request's wall seconds."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    t0 = time.perf_counter()
    reply = post_json(node.url + "/v1/chat/completions", body, timeout=600)
    return (
        reply["choices"][0]["message"]["content"] or "",
        int(reply["usage"]["completion_tokens"]),
        time.perf_counter() - t0,
    )


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def bench_model(path: Path, prompts: list[str], max_tokens: int, base: Path) -> None:
    from potluck.sharding.format.tokenizer import GGUFTokenizer

    swarm = {
        "POTLUCK_SWARM": f"tp-chat-{os.getpid()}",
        "POTLUCK_SWARM_SECRET": "potluck-bench-tp-chat",
        "POTLUCK_STATE_INTERVAL_S": "1",
        "POTLUCK_DHT_ENABLED": "false",
    }
    p2p = free_port()
    with (
        NodeProcess(base / "anchor", "-m", str(path), env=offline_env(base / "anchor")) as anchor,
        NodeProcess(
            base / "worker", "-m", str(path), "--p2p-port", str(p2p), env=offline_env(base / "worker", **swarm)
        ) as worker,
    ):
        anchor.wait_ready(300)
        worker.wait_ready(300)
        boot = f"/ip4/127.0.0.1/tcp/{p2p}/p2p/{get_json(worker.url + '/api/node')['peer_id']}"
        args = ("-m", str(path), "--bootstrap", boot, "--tensor-parallel", "2")
        with NodeProcess(base / "master", *args, env=offline_env(base / "master", **swarm)) as master:
            master.wait_ready(600)
            if "tensor-parallel group up: 2 ranks" not in master.output():
                raise SystemExit(f"the master did not form a 2-rank group:\n{master.output()}")
            model = get_json(master.url + "/v1/models")["data"][0]["id"]
            tok = GGUFTokenizer(path)
            rows = []
            wall = {"llama.cpp": [0.0, 0], "TP N=2": [0.0, 0]}
            for prompt in prompts:
                ref, n_ref, s_ref = chat(anchor, model, prompt, max_tokens)
                tp, n_tp, s_tp = chat(master, model, prompt, max_tokens)
                wall["llama.cpp"][0] += s_ref
                wall["llama.cpp"][1] += n_ref
                wall["TP N=2"][0] += s_tp
                wall["TP N=2"][1] += n_tp
                a, b = tok.tokenize(ref, add_bos=False), tok.tokenize(tp, add_bos=False)
                # identical answers (also those that end early) never diverge within the budget
                agree = max_tokens if ref == tp else agreeing_prefix(a, b)
                rows.append((prompt, agree, ref == tp, ref, tp))
            tok.close()
    print(f"\n== {path.name} (max_tokens {max_tokens})")
    for prompt, agree, same, ref, tp in rows:
        mark = "=" if same else "!"
        print(f"{mark} {agree:3d} {prompt}")
        if not same:
            print(f"      llama.cpp: {ref[:100]!r}\n      TP:        {tp[:100]!r}")
    agrees = [r[1] for r in rows]
    print(f"median agreeing tokens: {statistics.median(agrees)} of {max_tokens}; identical answers: "
          f"{sum(r[2] for r in rows)}/{len(rows)}")  # fmt: skip
    for side, (secs, n) in wall.items():
        print(f"{side:10s} {n / secs:6.1f} completion tokens/s (whole requests, prefill included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", help="GGUF (repeatable; default: the real models)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    args = ap.parse_args()
    models = args.model or real_models()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for path in models:
        with tempfile.TemporaryDirectory(prefix="potluck-bench-tp-chat-") as base:
            bench_model(path, PROMPTS[: args.prompts], args.max_tokens, Path(base))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
