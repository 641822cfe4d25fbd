"""The planner's forecasts: windows under each member's budget, infeasible groups, and the pick."""

from __future__ import annotations

import math
from types import SimpleNamespace

from potluck.sharding.format.gguf_tensors import open_gguf
from potluck.sharding.orchestration.forecast import Device, GroupForecast, ModelSizes, forecast_group, pick
from potluck.sharding.orchestration.selection import Candidate, WorkerSelector

MIB = 1 << 20


def sizes(model_path) -> ModelSizes:
    path = model_path("f32")  # 13.6 MB: 4 layers of ~3.1 MB, a 0.5 MB head
    return ModelSizes.of(open_gguf(path), path, 256)


def dev(name: str, budget: int, rtt: float = 0.0, disk_bw: float = 1e9) -> Device:
    return Device(name, budget, 10e9, disk_bw, 1.0, rtt)


def test_a_budget_below_one_layer_makes_the_group_infeasible_and_says_what_would_fit(model_path) -> None:
    model = sizes(model_path)
    alone = forecast_group(model, [dev("me", 4 * MIB)], 125e6)
    assert not alone.feasible and alone.s_per_token == math.inf and alone.window == 0
    assert "me (master) needs a budget of" in alone.short and "it gives 4.0 MiB" in alone.short
    pair = forecast_group(model, [dev("me", 4 * MIB), dev("w", 4 * MIB, 1e-3)], 125e6)
    assert pair.feasible and 1 <= pair.window < pair.layers  # half a layer each fits, not the whole share


def test_streaming_costs_disk_time_and_all_reduces_cost_round_trips(model_path) -> None:
    model = sizes(model_path)
    big = 1 << 30
    resident = forecast_group(model, [dev("me", big)], 125e6)
    assert resident.window == resident.layers
    # every prepacked byte (layers, KV cache, head) read once per token from memory at 10 GB/s
    weights_s = resident.rank_mib * 2**20 / 10e9
    assert weights_s < resident.s_per_token < weights_s * 1.15
    slow_disk = forecast_group(model, [dev("me", 12 * MIB, disk_bw=1e6)], 125e6)
    assert slow_disk.window < slow_disk.layers and slow_disk.s_per_token > 1.0  # megabytes at 1 MB/s
    far = forecast_group(model, [dev("me", big), dev("w", big, 0.05)], 125e6)
    assert far.s_per_token > 2 * model.geometry.n_layers * 0.05  # two all-reduces per layer, each a round trip


def test_pick_takes_the_fewest_devices_within_tolerance_of_the_fastest() -> None:
    rows = [
        GroupForecast(1, 0, 4, 10.0, math.inf, "too small"),
        GroupForecast(2, 2, 4, 5.0, 0.100),
        GroupForecast(3, 4, 4, 3.0, 0.097),
        GroupForecast(4, 4, 4, 2.0, 0.060),
    ]
    assert pick(rows).nodes == 4
    assert pick(rows[:3]).nodes == 2  # 3 devices are only 3 % faster than 2
    assert pick(rows[:1]) is None


def test_the_selector_lets_the_cost_model_choose_the_group_size(model_path) -> None:
    path = model_path("f32")
    me = SimpleNamespace(
        peer_id="me", ram_free=1 << 30, decode_tps=0.0, cores=2, rtt_s=0.0, memory_budget=0, memory_bw=0.0, disk_bw=0.0
    )
    peers = [Candidate(f"w{i}", 1 << 30, 0.0, 2, 0.001, 4 * MIB, 10e9, 1e9) for i in range(3)]
    ctx = SimpleNamespace(
        overlay=SimpleNamespace(local_peer=lambda: me, candidates=lambda: peers),
        call=lambda value, timeout: value,
        memory_budget=4 * MIB,  # the master's own budget: the model does not fit it alone
        join_timeout_s=1.0,
        check_stop=lambda: None,
    )
    selector = WorkerSelector(ctx, open_gguf(path), path, 256, want=0)
    rows = selector.forecasts(peers)
    assert [r.nodes for r in rows] == [1, 2, 3, 4]
    assert not rows[0].feasible
    chosen = selector.choose([], wait=False)
    best = pick(rows)
    assert best is not None and len(chosen) == best.nodes - 1 >= 1
    # a master whose budget holds the whole model is predicted fastest alone: no all-reduce
    ctx.memory_budget = 1 << 30
    assert selector.choose([], wait=False) == []


def test_bandwidth_probes_measure_something_and_leave_nothing_behind(tmp_path) -> None:
    from potluck.sharding.orchestration.forecast import measure_memory_bandwidth, probe_disk_bandwidth

    assert 1e8 < measure_memory_bandwidth(8 << 20, threads=1, runs=1) < 1e13  # bytes/s through MatMulNBits
    assert 1e6 < probe_disk_bandwidth(tmp_path / "spill", 1 << 20) < 1e12
    assert list((tmp_path / "spill").iterdir()) == []  # the temporary file is gone
