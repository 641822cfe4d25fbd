"""The TP engine against llama.cpp on the fixture models (in-process ranks over LocalStar).

The same checks over real processes and sockets are in tests/e2e/test_shard_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from potluck.routing.request import SamplingParams
from potluck.sharding.compute.engine import EngineOptions
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.orchestration.group import ThreadGroup, generate_ids
from tests.sharding.llama_ref import greedy_tokens, teacher_forced_logits


def group(path, n: int, hetero: bool = True, **kw) -> ThreadGroup:  # type: ignore[no-untyped-def]
    nodes = [NodeCapability(f"n{i}", 1 << 30, 1.0 + 0.5 * i * hetero) for i in range(n)]
    return ThreadGroup(path, nodes, EngineOptions(n_ctx=256, threads=1, spinning=False, **kw))


def tp_greedy(path, n: int, prompt_ids: list[int], max_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The TP engine's greedy tokens with ``n`` in-process ranks."""
    g = group(path, n)
    try:
        return list(generate_ids(g, prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), set()))
    finally:
        g.close()


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_greedy_tokens_equal_llama_cpp(model_path, kind, n) -> None:
    path = model_path(kind)
    prompt_ids, want = greedy_tokens(path)
    assert tp_greedy(path, n, prompt_ids, len(want)) == want


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_teacher_forced_top1_agreement(model_path, kind, n, record_property) -> None:
    """Equal-speed plans (as ``potluck shard generate`` makes them), default accuracy level 4."""
    path = model_path(kind)
    ids, ref = teacher_forced_logits(path)
    g = group(path, n, hetero=False)
    try:
        got = g.master.forward(ids, 0, all_logits=True)
    finally:
        g.close()
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    max_diff = float(np.abs(got - ref).max())
    record_property("top1_agreement", agree)
    record_property("max_logit_diff", max_diff)
    print(f"{kind} N={n}: top-1 agreement {agree:.4f} over {len(ids)} positions, max |logit diff| {max_diff:.4f}")
    assert agree >= 0.98
    assert max_diff < 0.5
    # any disagreement is a near-tie in llama.cpp's own logits (activation rounding differs: llama.cpp
    # rounds each 32-block's Q8_0 scale to float16, ORT keeps float32)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[got.argmax(1) != ref.argmax(1)]
    assert (margins < 0.05).all(), margins


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_teacher_forced_uneven_speeds(model_path, kind) -> None:
    """Speeds 1 : 1.5 : 2 (N = 3): an uneven split sums in another order; disagreements stay near-ties."""
    path = model_path(kind)
    ids, ref = teacher_forced_logits(path)
    g = group(path, 3)
    try:
        got = g.master.forward(ids, 0, all_logits=True)
    finally:
        g.close()
    top2 = np.sort(ref, axis=1)[:, -2:]
    wrong = got.argmax(1) != ref.argmax(1)
    print(f"{kind} N=3 uneven: agreement {1 - wrong.mean():.4f}, max |diff| {np.abs(got - ref).max():.4f}")
    assert wrong.mean() <= 0.03
    assert ((top2[:, 1] - top2[:, 0])[wrong] < 0.05).all()


def test_prefix_reuse_gives_the_same_tokens(model_path) -> None:
    path = model_path("f32")
    prompt_ids, want = greedy_tokens(path)
    g = group(path, 2)
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0)
        first = list(generate_ids(g, prompt_ids, params, set()))
        again = list(generate_ids(g, prompt_ids, params, set()))  # reuses the cached prefix
        other = list(generate_ids(g, prompt_ids[:-2], params, set()))  # shorter prompt: overwrites the cache
        final = list(generate_ids(g, prompt_ids, params, set()))
    finally:
        g.close()
    assert first == again == final == want[:12]
    assert other != first


def test_logits_gathered_in_chunks_of_rows_equal_one_gather(model_path, monkeypatch) -> None:
    """A prefill that wants every row's logits gathers the vocab-parallel head's slices in chunks
    of rows within the frame limit (here 3 rows a chunk): the same logits, bit for bit."""
    from potluck.sharding.compute import engine

    path = model_path("q8_0")
    ids, _ = teacher_forced_logits(path)
    g = group(path, 3)
    try:
        whole = g.master.forward(ids, 0, all_logits=True)
    finally:
        g.close()
    widest = max(s.vocab_count for s in g.master.compute.plan.shares)
    monkeypatch.setattr(engine, "GATHER_FRAME_BYTES", 3 * 4 * widest)
    g = group(path, 3)
    try:
        assert engine.gather_chunk_rows(g.master.compute.plan) == 3 < len(ids)
        assert g.master.forward(ids, 0, all_logits=True).tobytes() == whole.tobytes()
    finally:
        g.close()
