"""The signed cluster-state CRDT: validation, rejection counting, expiry, merge laws (hypothesis)."""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.overlay.state import (
    MAX_RECORD_BYTES,
    ClusterState,
    Hardware,
    Load,
    ModelAd,
    PeerRecord,
    SignedRecord,
    sign_record,
)
from potluck.overlay.swarm_metrics import OverlayMetrics
from tests.overlay.conftest import make_identity

NOW = 1_000_000.0
IDENTITIES = [make_identity() for _ in range(4)]


def record(ident, seq: int, swarm: str = "test", expires_in: float = 60.0, models: int = 1, queue: int = 0):
    return PeerRecord(
        peer_id=ident.peer_id,
        swarm=swarm,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{ident.peer_id}",),
        models=tuple(
            ModelAd(id=f"m{i}", quantization="Q8_0", n_ctx=256, n_layers=4, n_params=3_400_000) for i in range(models)
        ),
        hardware=Hardware(ram_total=8 << 30, ram_free=4 << 30, cores=2, decode_tps=100.0),
        load=Load(queue_depth=queue, active=0),
        version="0.1.0",
        seq=seq,
        expires_at=NOW + expires_in,
    )


def rejected(metrics: OverlayMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("potluck_overlay_records_rejected_total", {"reason": reason}) or 0.0


def test_valid_record_is_merged_and_newer_wins():
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    ident = IDENTITIES[0]
    assert state.merge_raw(sign_record(ident, record(ident, 1)).raw, NOW) is not None
    assert state.merge_raw(sign_record(ident, record(ident, 5, queue=3)).raw, NOW) is not None
    assert state.get(ident.peer_id).record.seq == 5
    assert state.get(ident.peer_id).record.load.queue_depth == 3
    assert metrics.registry.get_sample_value("potluck_overlay_records_accepted_total") == 2


def test_replayed_old_record_is_rejected_as_stale():
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    ident = IDENTITIES[0]
    old = sign_record(ident, record(ident, 1))
    state.merge_raw(sign_record(ident, record(ident, 2)).raw, NOW)
    assert state.merge_raw(old.raw, NOW) is None
    assert state.get(ident.peer_id).record.seq == 2
    assert rejected(metrics, "stale") == 1


def test_forged_record_is_rejected():
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    victim, forger = IDENTITIES[0], IDENTITIES[1]
    body = msgpack.packb(record(victim, 99).model_dump(), use_bin_type=True)
    forged = msgpack.packb({"body": body, "sig": forger.sign(b"potluck-record/1\x00" + body)}, use_bin_type=True)
    assert state.merge_raw(forged, NOW) is None
    # A valid signature over one body glued to another body is forged too.
    genuine = msgpack.unpackb(sign_record(victim, record(victim, 1)).raw)
    tampered = msgpack.packb({"body": body, "sig": genuine["sig"]}, use_bin_type=True)
    assert state.merge_raw(tampered, NOW) is None
    assert victim.peer_id not in state
    assert rejected(metrics, "forged") == 2


def test_unsigned_oversized_malformed_expired_foreign_are_rejected_and_counted():
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    ident = IDENTITIES[0]
    body = msgpack.packb(record(ident, 1).model_dump(), use_bin_type=True)
    assert state.merge_raw(msgpack.packb({"body": body, "sig": b""}), NOW) is None
    assert state.merge_raw(msgpack.packb({"body": body}), NOW) is None
    assert state.merge_raw(b"\x00" * (MAX_RECORD_BYTES + 1), NOW) is None
    assert state.merge_raw(b"\xc1garbage", NOW) is None
    assert state.merge_raw(msgpack.packb({"body": b"\x93\x01\x02\x03", "sig": b"x" * 64}), NOW) is None
    assert state.merge_raw(sign_record(ident, record(ident, 1, expires_in=-1)).raw, NOW) is None
    assert state.merge_raw(sign_record(ident, record(ident, 1, expires_in=10_000)).raw, NOW) is None
    assert state.merge_raw(sign_record(ident, record(ident, 1, swarm="other")).raw, NOW) is None
    assert len(state) == 0
    assert rejected(metrics, "unsigned") == 2
    assert rejected(metrics, "oversized") == 1
    assert rejected(metrics, "malformed") == 2
    assert rejected(metrics, "expired") == 2
    assert rejected(metrics, "foreign_swarm") == 1


def test_unknown_fields_are_refused():
    ident = IDENTITIES[0]
    fields = record(ident, 1).model_dump()
    fields["evil"] = 1
    body = msgpack.packb(fields, use_bin_type=True)
    raw = msgpack.packb({"body": body, "sig": ident.sign(b"potluck-record/1\x00" + body)}, use_bin_type=True)
    state = ClusterState("test")
    assert state.merge_raw(raw, NOW) is None


def test_signing_refuses_other_peers_and_oversized_records():
    with pytest.raises(ValueError):
        sign_record(IDENTITIES[0], record(IDENTITIES[1], 1))
    with pytest.raises(ValueError):
        big = record(IDENTITIES[0], 1).model_copy(
            update={
                "models": tuple(
                    ModelAd(id="m" * 250 + str(i), quantization="Q8_0", n_ctx=1, n_layers=1, n_params=1)
                    for i in range(64)
                )
            }
        )
        sign_record(IDENTITIES[0], big)


def test_expiry_drops_peers_from_the_view():
    state = ClusterState("test")
    a, b = IDENTITIES[0], IDENTITIES[1]
    state.merge_raw(sign_record(a, record(a, 1, expires_in=5)).raw, NOW)
    state.merge_raw(sign_record(b, record(b, 1, expires_in=50)).raw, NOW)
    assert state.expire(NOW + 1) == []
    assert state.expire(NOW + 10) == [a.peer_id]
    assert a.peer_id not in state and b.peer_id in state


def test_digest_and_newer_than_drive_anti_entropy():
    state = ClusterState("test")
    a, b = IDENTITIES[0], IDENTITIES[1]
    state.merge_raw(sign_record(a, record(a, 3)).raw, NOW)
    state.merge_raw(sign_record(b, record(b, 7)).raw, NOW)
    assert state.digest() == {a.peer_id: 3, b.peer_id: 7}
    assert [r.peer_id for r in state.newer_than({a.peer_id: 3, b.peer_id: 6})] == [b.peer_id]


# ------------------------------------------------------------------ CRDT laws
_SIGNED: dict[tuple[int, int, int], SignedRecord] = {}


def _signed(who: int, seq: int, queue: int) -> SignedRecord:
    key = (who, seq, queue)
    if key not in _SIGNED:
        ident = IDENTITIES[who]
        _SIGNED[key] = sign_record(ident, record(ident, seq, queue=queue))
    return _SIGNED[key]


records_st = st.lists(st.builds(_signed, st.integers(0, 3), st.integers(0, 4), st.integers(0, 2)), max_size=8)


def _state(records: list[SignedRecord]) -> ClusterState:
    state = ClusterState("test")
    for r in records:
        state.merge_record(r)
    return state


def _join(*states: ClusterState) -> dict[str, bytes]:
    out = ClusterState("test")
    for s in states:
        out.merge(s)
    return _view(out)


def _view(state: ClusterState) -> dict[str, bytes]:
    return {r.peer_id: r.raw for r in state.records()}


@settings(max_examples=150, deadline=None)
@given(records_st, records_st)
def test_merge_is_commutative(xs, ys):
    a, b = _state(xs), _state(ys)
    assert _join(a, b) == _join(b, a)


@settings(max_examples=150, deadline=None)
@given(records_st, records_st, records_st)
def test_merge_is_associative(xs, ys, zs):
    a, b, c = _state(xs), _state(ys), _state(zs)
    ab = _state([])
    ab.merge(a)
    ab.merge(b)
    bc = _state([])
    bc.merge(b)
    bc.merge(c)
    assert _join(ab, c) == _join(a, bc)


@settings(max_examples=150, deadline=None)
@given(records_st)
def test_merge_is_idempotent(xs):
    a = _state(xs)
    assert _join(a, a) == _view(a)


@settings(max_examples=100, deadline=None)
@given(records_st)
def test_merge_order_of_single_records_does_not_matter(xs):
    assert _view(_state(xs)) == _view(_state(list(reversed(xs))))


def test_wall_clock_records_are_accepted_now():
    ident = IDENTITIES[0]
    rec = record(ident, 1).model_copy(update={"expires_at": time.time() + 30})
    assert ClusterState("test").merge_raw(sign_record(ident, rec).raw, time.time()) is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_bw", -1.0), ("disk_bw", 1e30), ("memory_bw", "fast"), ("memory_budget", -5), ("disk_bw", True)],
)
def test_signed_records_with_out_of_range_bandwidths_are_refused(field, value):
    """The bandwidths and budget a peer advertises feed every master's planner: a signed record
    whose values are out of range or of the wrong type is refused, not clamped."""
    ident = IDENTITIES[0]
    fields = record(ident, 1).model_dump()
    fields["hardware"][field] = value
    body = msgpack.packb(fields, use_bin_type=True)
    raw = msgpack.packb({"body": body, "sig": ident.sign(b"potluck-record/1\x00" + body)}, use_bin_type=True)
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    assert state.merge_raw(raw, NOW) is None
    assert rejected(metrics, "malformed") == 1
    good = record(ident, 1).model_copy(
        update={"hardware": Hardware(ram_total=1, ram_free=1, cores=1, decode_tps=0.0, memory_bw=3e10, disk_bw=2e9)}
    )
    assert state.merge_raw(sign_record(ident, good).raw, NOW) is not None
