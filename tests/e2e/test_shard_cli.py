"""`potluck shard generate` over real worker processes and TCP sockets, against llama.cpp."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from potluck.routing.request import SamplingParams
from potluck.sharding.compute.engine import EngineOptions
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.orchestration.group import generate_ids
from potluck.sharding.orchestration.launch import ProcessGroup
from tests.sharding.llama_ref import STEADY_PROMPT, greedy_tokens

pytestmark = pytest.mark.e2e


def potluck(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "potluck"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shard_generate_equals_llama_cpp_greedy(model_path, tmp_path, kind, n) -> None:
    path = model_path(kind)
    _, want = greedy_tokens(path)
    res = potluck(
        "shard",
        "generate",
        "--model",
        str(path),
        "--nodes",
        str(n),
        "--prompt",
        STEADY_PROMPT,
        "--max-tokens",
        "48",
        "--temperature",
        "0",
        "--json",
        "--shard-dir",
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"] == want
    assert out["text"].startswith("er is there?")


def test_shard_generate_under_a_memory_budget_streams_layers_with_the_same_tokens(model_path, tmp_path) -> None:
    """Every rank (master and worker process) over a 4 MiB budget keeps a window of the F32
    fixture's layers (3 MiB each at N = 1, 1.5 MiB at N = 2) and still gives llama.cpp's tokens."""
    path = model_path("f32")
    _, want = greedy_tokens(path)
    args = ["shard", "generate", "-m", str(path), "-n", "2", "-p", STEADY_PROMPT, "--max-tokens", "48", "-t", "0"]
    res = potluck(*args, "--json", "--shard-dir", str(tmp_path), "--memory-budget", "3MiB")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tokens"] == want
    spilled = sorted(p.name for p in (tmp_path / "spill").rglob("*.data"))
    assert any(n.startswith("l0.attn") for n in spilled) and len(spilled) >= 2 * 4  # both ranks' layer files
    res = potluck(*args, "--memory-budget", "200KiB")
    assert res.returncode == 1
    assert "holds a window of one layer" in res.stderr and "Traceback" not in res.stderr
    res = potluck(*args, "--memory-budget", "lots")
    assert res.returncode == 2 and "is not a size" in res.stderr


def test_shard_plan_predicts_each_group_size_and_picks_one(model_path) -> None:
    args = ["shard", "plan", "-m", str(model_path("q4_0")), "--ctx", "256", "--predict", "--max-nodes", "4", "--json"]
    wired = json.loads(potluck(*args, "--memory-budget", "1MiB").stdout)
    wifi = json.loads(potluck(*args, "--memory-budget", "1MiB", "--link", "wifi").stdout)
    assert wired["memory_bw"] > 0 and wired["disk_bw"] > 0 and wired["budget"] == 1 << 20
    groups = {g["nodes"]: g for g in wired["groups"]}
    assert set(groups) <= {1, 2, 3, 4} and wired["pick"] in groups
    assert all(g["s_per_token"] > 0 and 1 <= g["window"] <= g["layers"] for g in groups.values())
    for g in wifi["groups"]:  # same weights, a slower link: every multi-device group is predicted slower
        if g["nodes"] > 1:
            assert g["s_per_token"] > groups[g["nodes"]]["s_per_token"]
    res = potluck(*args[:-1], "--link", "carrier-pigeon")
    assert res.returncode == 2 and "--link must be one of" in res.stderr
    # each flag belongs to one mode: given to the other, it is refused by name, never ignored
    res = potluck(*args, "--speeds", "1,2")
    assert res.returncode == 2 and "--speeds does not apply with --predict" in res.stderr
    res = potluck("shard", "plan", "-m", str(model_path("q4_0")), "--link", "wifi", "--memory-budget", "1GiB")
    assert res.returncode == 2 and "--memory-budget, --link do not apply without --predict" in res.stderr


def test_shard_generate_reports_bad_input(tmp_path) -> None:
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a gguf at all")
    res = potluck("shard", "generate", "--model", str(bogus), "--prompt", "hi")
    assert res.returncode == 1
    assert "error" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_worker_killed_or_stalled_mid_generation_request_completes(model_path, tmp_path, how) -> None:
    path = model_path("f32")
    prompt_ids, want = greedy_tokens(path)
    nodes = [NodeCapability(f"local-{i}", 1 << 30, 1.0) for i in range(3)]
    got: list[int] = []
    with ProcessGroup(path, nodes, EngineOptions(n_ctx=256), tmp_path, timeout_s=1.0) as group:
        victim = group.pid(2)
        try:
            for token in generate_ids(group, prompt_ids, SamplingParams(max_tokens=48, temperature=0.0), set()):
                got.append(token)
                if len(got) == 10:
                    os.kill(victim, how)
            assert group.master.world_size == 2
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)  # normally the group has already killed and reaped it
    assert got == want


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_shard_perplexity_beside_llama_cpp(model_path, tmp_path, kind) -> None:
    """`potluck shard perplexity` on 2 worker processes: the F32 engine reproduces llama.cpp's
    perplexity, the Q8_0 one (lossless repack) stays within 0.5 %, and the argmax tokens agree."""
    from tests.sharding.llama_ref import PASSAGE

    text = tmp_path / "passage.txt"
    text.write_text(PASSAGE * 2)
    res = potluck("shard", "perplexity", "--model", str(model_path(kind)), "--file", str(text), "--nodes", "2")
    assert res.returncode == 1 and "fewer than --ctx 512" in res.stderr  # the default window is too long
    args = ("--model", str(model_path(kind)), "--file", str(text), "--nodes", "2", "--ctx", "160", "--json")
    res = potluck("shard", "perplexity", *args)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["n_tokens"] == 160 and report["nodes"] == 2
    assert 1.0 < report["llama_cpp_perplexity"] < 512.0
    assert report["ratio"] == pytest.approx(1.0, abs=1e-3 if kind == "f32" else 5e-3)
    assert report["top1_agreement"] >= (0.99 if kind == "f32" else 0.97)


def test_shard_perplexity_with_fused_attention(model_path, tmp_path) -> None:
    """`--attention fused` over a master and a worker process: llama.cpp's perplexity within 0.5 %;
    an unknown block is refused by name."""
    from tests.sharding.llama_ref import PASSAGE

    text = tmp_path / "passage.txt"
    text.write_text(PASSAGE * 2)
    args = ("--model", str(model_path("q8_0")), "--file", str(text), "--nodes", "2", "--ctx", "160", "--json")
    res = potluck("shard", "perplexity", *args, "--attention", "fused")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["ratio"] == pytest.approx(1.0, abs=5e-3) and report["top1_agreement"] >= 0.97
    res = potluck("shard", "perplexity", *args, "--attention", "flash")
    assert res.returncode == 2 and "--attention" in res.stderr
