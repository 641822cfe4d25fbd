"""Tensor-parallel fidelity on real models: perplexity ratio and top-1 agreement against llama.cpp.

    .venv/bin/python bench/tp_fidelity.py [--nodes 1,2,3] [--ctx 384] [--text FILE] [--dir DIR]

For each real model of ``../shared/scripts/real-models`` (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M
Q4_K_M) and SmolLM2 re-quantized by llama.cpp to Q4_K_M (``llama_model_quantize``, cached in
``DIR``), runs ``potluck shard perplexity --json`` with N ranks as real processes: one window of
``--ctx`` tokens of ``--text`` (default: the shared ARCHITECTURE.md), scored by the TP engine and
by llama.cpp on the same GGUF in the same run. Prints both perplexities, their ratio (goal <= 1.005)
and the top-1 agreement of the two engines (goal >= 0.97; issue #10).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tp_chat import real_models  # noqa: E402
from tp_extract import build_q4_k_m  # noqa: E402


def perplexity(model: Path, text: Path, n: int, ctx: int) -> dict:  # type: ignore[type-arg]
    """``potluck shard perplexity --json`` of ``model`` with ``n`` ranks."""
    exe = Path(sys.executable).parent / "potluck"
    cmd = [str(exe), "shard", "perplexity", "-m", str(model), "-f", str(text)]
    done = subprocess.run([*cmd, "-n", str(n), "--ctx", str(ctx), "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    from potluck.config import default_cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2,3", help="comma-separated rank counts")
    ap.add_argument("--ctx", type=int, default=384, help="tokens scored from the text's start")
    ap.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "docs" / "ARCHITECTURE.md")
    ap.add_argument("--dir", type=Path, default=default_cache_dir() / "bench")
    args = ap.parse_args()
    smol, gemma = real_models()
    smol_k = args.dir / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    if not smol_k.exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        build_q4_k_m(smol, smol_k)
    files = {"SmolLM2 Q4_1": smol, "SmolLM2 Q4_K_M": smol_k, "Gemma 3 Q4_K_M": gemma}
    print(f"text: {args.text} ({args.ctx} tokens)")
    print(f"{'model':16s} {'N':>2s} {'TP ppl':>9s} {'llama.cpp':>9s} {'ratio':>7s} {'top-1':>6s}")
    for name, path in files.items():
        for n in (int(x) for x in args.nodes.split(",")):
            r = perplexity(path, args.text, n, args.ctx)
            print(
                f"{name:16s} {n:2d} {r['tp_perplexity']:9.3f} {r['llama_cpp_perplexity']:9.3f} "
                f"{r['ratio']:7.4f} {r['top1_agreement']:6.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
