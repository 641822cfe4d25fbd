"""The tensor-parallel cost model's arithmetic."""

from __future__ import annotations

import pytest

from potluck.sharding.format.cost import LinkCost, RankCost, allreduce_s, predict_s_per_token, token_exchange_s


def test_one_rank_costs_its_weight_streaming_only() -> None:
    rank = RankCost(resident_bytes=2e9, streamed_bytes=1e9, memory_bw=20e9, disk_bw=1e9)
    assert rank.weight_s == pytest.approx(0.1 + 1.0)
    assert predict_s_per_token([rank], 80, 8192, LinkCost(1e-3, 1e8)) == pytest.approx(1.1)
    assert RankCost(2e9, 0, 20e9, 0.0).weight_s == pytest.approx(0.1)  # nothing streamed: no disk term


def test_the_slowest_rank_and_two_all_reduces_per_layer() -> None:
    fast = RankCost(1e9, 0, 20e9, 1e9)
    slow = RankCost(1e9, 5e8, 20e9, 1e9)
    link = LinkCost(rtt_s=3e-3, bandwidth=12.5e6)  # Wi-Fi
    one = allreduce_s(8192, link)
    assert one == pytest.approx(3e-3 + 2 * 8192 * 4 / 12.5e6)
    got = predict_s_per_token([fast, slow, fast], 80, 8192, link, vocab=128256)
    token = token_exchange_s(8192, 128256, 3, link)
    assert token == pytest.approx(3e-3 + (8192 + 128256 / 3) * 4 / 12.5e6)  # embedding down, logits slices up
    assert got == pytest.approx(slow.weight_s + 160 * one + token)
    # the latency chain alone on Wi-Fi is about 0.9 s/token at 80 layers: fewer ranks can be faster
    assert 160 * one > 0.8


def test_the_exchange_overhead_adds_to_every_all_reduce_and_to_the_token_exchange() -> None:
    rank = RankCost(1e9, 0, 20e9, 1e9)
    bare, slow = LinkCost(3e-4, 125e6), LinkCost(3e-4, 125e6, overhead_s=1e-4)
    delta = predict_s_per_token([rank] * 2, 22, 2048, slow) - predict_s_per_token([rank] * 2, 22, 2048, bare)
    assert delta == pytest.approx((2 * 22 + 1) * 1e-4)
