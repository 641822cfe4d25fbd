"""Sliding-window residency: a rank over its memory budget keeps a window of layers, gives the same
tokens and logits as a fully resident rank, and its resident memory (measured) stays in budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from potluck.errors import ShardPlanError
from potluck.routing.request import SamplingParams
from potluck.sharding.compute.engine import EngineOptions
from potluck.sharding.format.extract import extract_shard
from potluck.sharding.format.gguf_tensors import open_gguf
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.format.shard_file import write_shard
from potluck.sharding.format.synthetic import Geometry, write_random_gguf
from potluck.sharding.orchestration.group import ThreadGroup, generate_ids, plan_for

ROOT = Path(__file__).resolve().parents[3]
MiB = 1 << 20


def run(path: Path, n: int, options: EngineOptions, ids: list[int], max_tokens: int) -> tuple[np.ndarray, list[int]]:
    """Teacher-forced logits of ``ids`` and the greedy continuation, with ``n`` in-process ranks."""
    g = ThreadGroup(path, [NodeCapability(f"n{i}", 1 << 30, 1.0) for i in range(n)], options)
    try:
        logits = g.master.forward(ids, 0, all_logits=True)
        g.master.cached_ids = []  # generate_ids starts over at position 0
        tokens = list(generate_ids(g, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), set()))
        window = g.master.compute.window
        assert (window is not None) == (options.memory_budget > 0)
        if window is not None:
            assert window.window < window.n_layers and window.stats.released > 0 and window.stats.fetched > 0
    finally:
        g.close()
    return logits, tokens


# budgets under the fixture's 4 layers (F32: 3 MiB per layer at N = 1; Q4_0: 0.7 MiB)
@pytest.mark.parametrize(("kind", "budget"), [("f32", 4 * MiB), ("q4_0", MiB)])
@pytest.mark.parametrize("n", [1, 2])
def test_a_windowed_rank_computes_what_a_resident_one_does(model_path, tmp_path, kind, budget, n) -> None:
    path = model_path(kind)
    ids = list(range(1, 17))
    resident = run(path, n, EngineOptions(n_ctx=64, threads=1), ids, 12)
    windowed = run(path, n, EngineOptions(n_ctx=64, threads=1, memory_budget=budget, spill_dir=tmp_path), ids, 12)
    np.testing.assert_allclose(windowed[0], resident[0], rtol=0, atol=1e-5)
    assert windowed[1] == resident[1]


def test_a_budget_too_small_for_one_layer_names_what_would_fit(model_path, tmp_path) -> None:
    options = EngineOptions(n_ctx=64, threads=1, memory_budget=2 * MiB, spill_dir=tmp_path)
    with pytest.raises(ShardPlanError, match=r"too small: .* at least \d+ MiB holds a window of one layer"):
        run(model_path("f32"), 1, options, [1, 2, 3], 1)


def test_a_budget_without_a_spill_directory_is_refused(model_path) -> None:
    with pytest.raises(ShardPlanError, match="no spill directory"):
        run(model_path("f32"), 1, EngineOptions(n_ctx=64, threads=1, memory_budget=4 * MiB), [1, 2, 3], 1)


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory) -> Path:
    """One rank's shard of a 12-layer random model with 8.4 MiB of prepacked weights per layer."""
    d = tmp_path_factory.mktemp("residency")
    gguf = d / "m.gguf"
    write_random_gguf(gguf, Geometry(1024, 12, 2816, 16, 4, 2048, 512), "q4_0")
    reader = open_gguf(gguf)
    plan = plan_for(reader, gguf, [NodeCapability("n0", 1 << 34, 1.0)], 64)
    shard = extract_shard(reader, plan, 0)
    write_shard(d / "rank0.pshard", shard.meta, shard.tensors)
    return d / "rank0.pshard"


def probe(shard: Path, spill: Path, budget: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tests.sharding.compute.rss_probe", str(shard), str(spill), str(budget), "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


SLACK = 24 * MiB  # ORT's activation arena, Python objects, the touched embedding rows (measured: 8)


def test_resident_memory_stays_within_the_budget(big_shard, tmp_path) -> None:
    budget = 32 * MiB
    resident = probe(big_shard, tmp_path / "a", 0)
    windowed = probe(big_shard, tmp_path / "b", budget)
    grown = windowed["peak"] - windowed["base"]
    print(f"resident: +{(resident['peak'] - resident['base']) / MiB:.0f} MiB; window of {windowed['window']}: "
          f"+{grown / MiB:.0f} MiB (budget {budget / MiB:.0f} MiB)")  # fmt: skip
    assert 1 <= windowed["window"] < 12
    assert grown <= budget + SLACK
    assert resident["peak"] - resident["base"] > 2.5 * budget  # the model really does not fit the budget
    assert windowed["tokens"] == resident["tokens"]
