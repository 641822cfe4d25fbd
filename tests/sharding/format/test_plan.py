"""Planner: proportional shares, memory limits, uneven head counts, serialization."""

from __future__ import annotations

import json

import pytest

from potluck.errors import ShardPlanError
from potluck.sharding.format.extract import plan_geometry
from potluck.sharding.format.gguf_tensors import open_gguf, read_config
from potluck.sharding.format.plan import FFN_BLOCK, MEMORY_HEADROOM, NodeCapability, PlanGeometry, ShardPlan, make_plan

GB = 1 << 30


def geometry(n_kv: int = 8, ffn: int = 5632, n_layers: int = 22) -> PlanGeometry:
    """Llama-1B-like sizes (Q4_0 bytes)."""
    return PlanGeometry(
        n_layers=n_layers,
        n_kv_heads=n_kv,
        group=4,
        head_dim=64,
        hidden=2048,
        ffn=ffn,
        kv_group_bytes=4 * 64 * 2048 * 18 // 32 * 2 + 2 * 64 * 2048 * 18 // 32,
        kv_cache_group_bytes=2 * 2048 * 64 * 2,
        ffn_block_bytes=3 * 32 * 2048 * 18 // 32,
        replicated_bytes=22 * 2 * 2048 * 4,
        master_bytes=2 * 32000 * 2048 * 18 // 32,
    )


def nodes(*specs: tuple[float, float]) -> list[NodeCapability]:
    return [NodeCapability(f"n{i}", int(ram * GB), speed) for i, (ram, speed) in enumerate(specs)]


def test_heterogeneous_speeds_give_proportional_shares() -> None:
    g = geometry()
    plan = make_plan(g, nodes((8, 1.0), (8, 2.0), (8, 1.0)), "m", 32, 2048)
    work = [
        s.kv_count * (g.kv_group_bytes + g.kv_cache_group_bytes) + s.ffn_count // FFN_BLOCK * g.ffn_block_bytes
        for s in plan.shares
    ]
    total = sum(work)
    for share, w, want in zip(plan.shares, work, (0.25, 0.5, 0.25), strict=True):
        assert w / total == pytest.approx(want, abs=0.02), share
    assert [s.kv_count for s in plan.shares] == [2, 4, 2]


def test_memory_limits_are_respected_and_overflow_moves_to_others() -> None:
    g = geometry()
    # the fast node has little memory: it must not exceed it, the others take the rest
    plan = make_plan(g, nodes((8, 1.0), (0.3, 10.0), (8, 1.0)), "m", 32, 2048)
    small = plan.shares[1]
    assert small.est_bytes <= 0.3 * GB * MEMORY_HEADROOM
    assert small.ffn_count + small.kv_count > 0
    assert sum(s.ffn_count for s in plan.shares) == g.ffn


def test_not_enough_memory_is_a_clear_error() -> None:
    with pytest.raises(ShardPlanError, match="need"):
        make_plan(geometry(), nodes((0.2, 1.0), (0.2, 1.0)), "m", 32, 2048)
    with pytest.raises(ShardPlanError, match="master"):
        make_plan(geometry(), nodes((0.01, 1.0), (8, 1.0)), "m", 32, 2048)
    with pytest.raises(ShardPlanError):
        make_plan(geometry(), nodes((8, 0.0)), "m", 32, 2048)


def test_uneven_heads_three_nodes_four_kv_groups() -> None:
    g = geometry(n_kv=4)
    plan = make_plan(g, nodes((8, 1.0), (8, 1.0), (8, 1.0)), "m", 32, 2048)
    assert sorted(s.kv_count for s in plan.shares) == [1, 1, 2]
    # the FFN evens out the coarse head split: the node with 2 KV groups gets fewer columns
    two = next(s for s in plan.shares if s.kv_count == 2)
    assert two.ffn_count < min(s.ffn_count for s in plan.shares if s.kv_count == 1)
    assert all(s.ffn_count % FFN_BLOCK == 0 and s.ffn_start % FFN_BLOCK == 0 for s in plan.shares)


def test_a_node_may_get_zero_heads() -> None:
    plan = make_plan(geometry(n_kv=4), nodes(*[(8, 1.0)] * 6), "m", 32, 2048)
    assert sum(s.kv_count for s in plan.shares) == 4
    assert any(s.kv_count == 0 for s in plan.shares)


def test_serialization_round_trips_and_is_versioned() -> None:
    plan = make_plan(geometry(n_kv=4), nodes((8, 1.0), (8, 3.0)), "m", 32, 2048)
    assert ShardPlan.from_msgpack(plan.to_msgpack()) == plan
    assert ShardPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert ShardPlan.from_dict(plan.to_dict()).plan_id == plan.plan_id
    with pytest.raises(ShardPlanError, match="version"):
        ShardPlan.from_dict({**plan.to_dict(), "version": 99})
    bad = plan.to_dict()
    bad["shares"][1]["kv_start"] += 1
    with pytest.raises(ShardPlanError):
        ShardPlan.from_dict(bad)
    with pytest.raises(ShardPlanError):
        ShardPlan.from_dict({**plan.to_dict(), "surprise": 1})
    with pytest.raises(ShardPlanError):
        ShardPlan.from_msgpack(b"\xc1garbage")


def test_plan_from_the_fixture_gguf(model_path) -> None:
    reader = open_gguf(model_path("q4_0"))
    config = read_config(reader)
    g = plan_geometry(reader, config, 256)
    plan = make_plan(g, nodes((1, 1.0), (1, 1.0), (1, 1.0)), "tiny", config.n_heads, 256)
    assert (plan.n_kv_heads, plan.ffn, plan.world_size) == (4, 768, 3)
    assert sum(s.kv_count for s in plan.shares) == 4


def test_the_output_head_is_split_by_vocabulary_rows_in_proportion_to_speed(model_path) -> None:
    reader = open_gguf(model_path("q4_0"))
    config = read_config(reader)
    g = plan_geometry(reader, config, 256)
    assert g.vocab == config.vocab and g.head_row_bytes > 0
    plan = make_plan(g, nodes((1, 1.0), (1, 2.0), (1, 1.0)), "tiny", config.n_heads, 256)
    counts = [s.vocab_count for s in plan.shares]
    assert sum(counts) == config.vocab and [s.vocab_start for s in plan.shares] == [0, counts[0], sum(counts[:2])]
    assert counts == pytest.approx([config.vocab / 4, config.vocab / 2, config.vocab / 4], abs=1)
    assert [plan.head_bytes(r) for r in range(3)] == [c * g.head_row_bytes for c in counts]
    alone = make_plan(g, nodes((1, 1.0)), "tiny", config.n_heads, 256)
    assert alone.shares[0].vocab_count == config.vocab  # one rank holds the whole head
    bad = plan.to_dict()
    bad["shares"][2]["vocab_start"] += 1  # a gap in the vocabulary
    with pytest.raises(ShardPlanError, match="vocabulary range"):
        ShardPlan.from_dict(bad)
