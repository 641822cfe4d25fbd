"""Reputation from attestations: bounded, decaying, own verdicts first, strangers' votes ignored."""

from __future__ import annotations

from potluck.overlay.verification.attestations import sign
from potluck.overlay.verification.reputation import EXCLUDE_BELOW, HALF_LIFE_S, standings
from tests.overlay.conftest import make_identity

SHA = "cd" * 32
ME, HONEST, CHEAT, STRANGER = (make_identity() for _ in range(4))
NOW = 1_000_000.0


def att(by, on, verdict, at=NOW, detail=""):
    return sign(by, on.peer_id, SHA, "logprob", verdict, bytes(16), detail, at=at)


def test_no_evidence_is_neutral_and_not_excluded():
    assert standings([], ME.peer_id, NOW) == {}


def test_one_own_failure_excludes_and_says_why():
    s = standings([att(ME, CHEAT, "fail", detail="token 0: logprob -1.2 vs local -0.9")], ME.peer_id, NOW)
    st = s[CHEAT.peer_id]
    assert st.reputation < EXCLUDE_BELOW
    assert st.excluded is not None and "logprob" in st.excluded and "token 0" in st.excluded


def test_scores_stay_in_bounds_and_passes_raise_them():
    many_pass = [att(ME, HONEST, "pass", at=NOW - i) for i in range(500)]
    many_fail = [att(ME, CHEAT, "fail", at=NOW - i) for i in range(500)]
    s = standings(many_pass + many_fail, ME.peer_id, NOW)
    assert 0.9 < s[HONEST.peer_id].reputation <= 1.0 and s[HONEST.peer_id].excluded is None
    assert 0.0 <= s[CHEAT.peer_id].reputation < 0.01


def test_old_failures_decay():
    old = [att(ME, CHEAT, "fail", at=NOW - 20 * HALF_LIFE_S)]
    assert standings(old, ME.peer_id, NOW)[CHEAT.peer_id].excluded is None
    fresh_after_old_passes = [att(ME, CHEAT, "pass", at=NOW - 20 * HALF_LIFE_S + i) for i in range(10)]
    fresh_after_old_passes.append(att(ME, CHEAT, "fail"))
    assert standings(fresh_after_old_passes, ME.peer_id, NOW)[CHEAT.peer_id].excluded is not None


def test_strangers_cannot_vote_an_honest_peer_out():
    sybils = [make_identity() for _ in range(20)]
    votes = [att(s, HONEST, "fail") for s in sybils]
    st = standings(votes, ME.peer_id, NOW)[HONEST.peer_id]
    assert st.excluded is None and st.fails == 0


def test_verdicts_of_a_peer_we_found_honest_count():
    evidence = [att(ME, HONEST, "pass"), att(ME, HONEST, "pass"), att(HONEST, CHEAT, "fail")]
    st = standings(evidence, ME.peer_id, NOW)[CHEAT.peer_id]
    assert st.fails == 1 and st.excluded is not None and HONEST.peer_id[-8:] in st.excluded


def test_a_peer_vouching_for_itself_counts_for_nothing():
    assert standings([att(CHEAT, CHEAT, "pass")], ME.peer_id, NOW) == {}
