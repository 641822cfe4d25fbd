"""Signed attestations: valid ones travel in their attester's record; forged ones are rejected
and counted as forged records by the cluster state."""

from __future__ import annotations

import os

from potluck.overlay.state import MAX_RECORD_BYTES, ClusterState, sign_record
from potluck.overlay.swarm_metrics import OverlayMetrics
from potluck.overlay.verification.attestations import MAX_ATTESTATIONS, problem, sign
from tests.overlay.conftest import make_identity
from tests.overlay.test_state import NOW, record, rejected

SHA = "ab" * 32
A, B, C = make_identity(), make_identity(), make_identity()


def carrying(ident, attestations, seq: int = 1):
    return sign_record(ident, record(ident, seq).model_copy(update={"attestations": tuple(attestations)}))


def test_signed_attestation_is_accepted_inside_its_attesters_record():
    att = sign(A, B.peer_id, SHA, "logprob", "fail", os.urandom(16), "token 3: logprob off", at=NOW)
    assert problem(att, A.peer_id) is None
    state = ClusterState("test", OverlayMetrics())
    merged = state.merge_raw(carrying(A, [att]).raw, NOW)
    assert merged is not None and merged.record.attestations == (att,)


def test_attestation_altered_after_signing_is_rejected_as_forged():
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    honest = sign(A, B.peer_id, SHA, "logprob", "pass", os.urandom(16), at=NOW)
    forged = honest.model_copy(update={"verdict": "fail"})  # flips the verdict, keeps the signature
    assert problem(forged, A.peer_id) == f"attestation on {B.peer_id} has a bad signature"
    assert state.merge_raw(carrying(A, [forged]).raw, NOW) is None
    assert A.peer_id not in state
    assert rejected(metrics, "forged") == 1


def test_attestation_in_another_peers_record_is_rejected_as_forged():
    """C cannot pass off A's (validly signed) verdict as its own, nor forge one in A's name."""
    metrics = OverlayMetrics()
    state = ClusterState("test", metrics)
    by_a = sign(A, B.peer_id, SHA, "possession", "fail", os.urandom(16), at=NOW)
    assert state.merge_raw(carrying(C, [by_a]).raw, NOW) is None
    in_a_name = sign(C, B.peer_id, SHA, "possession", "fail", os.urandom(16), at=NOW).model_copy(
        update={"attester": A.peer_id}
    )
    assert state.merge_raw(carrying(C, [in_a_name], seq=2).raw, NOW) is None
    assert rejected(metrics, "forged") == 2
    assert C.peer_id not in state


def test_a_full_list_of_attestations_fits_a_record():
    atts = [
        sign(A, make_identity().peer_id, SHA, "majority", "fail", os.urandom(16), "x" * 120, at=NOW)
        for _ in range(MAX_ATTESTATIONS)
    ]
    signed = carrying(A, atts)
    assert len(signed.raw) < MAX_RECORD_BYTES // 2
    assert ClusterState("test").merge_raw(signed.raw, NOW) is not None
