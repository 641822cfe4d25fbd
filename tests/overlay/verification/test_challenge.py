"""The challenge prompt and the tolerance check, on hand-made answers (no model needed)."""

from __future__ import annotations

from potluck.overlay.verification.challenge import (
    GAP_EPSILON,
    LOGPROB_TOLERANCE,
    MIN_COMPARED,
    Answer,
    agree,
    judge,
    majority,
    prompt_for,
)

N = 16


def walk(n: int = N, gaps: dict[int, float] | None = None) -> Answer:
    return Answer(
        tuple(f"t{i}".encode() for i in range(n)),
        tuple(-0.5 for _ in range(n)),
        tuple((gaps or {}).get(i, 1.5) for i in range(n)),
    )


def shifted(a: Answer, by: float) -> Answer:
    return Answer(a.tokens, tuple(x + by for x in a.logprobs), a.gaps)


def swapped(a: Answer, at: int) -> Answer:
    """``a`` with another token at ``at`` and other continuations after it."""
    return Answer(a.tokens[:at] + tuple(b"x%d" % i for i in range(at, len(a.tokens))), a.logprobs, a.gaps)


def test_prompts_are_salted_by_the_nonce():
    a, b = prompt_for(bytes(16)), prompt_for(b"\x01" + bytes(15))
    assert a != b and a == prompt_for(bytes(16))
    assert a.endswith("\n") and len(a.split()) == 12


def test_exact_answer_passes_and_small_drift_is_tolerated():
    local = walk()
    assert judge(local, local, N)[0] == "pass"
    assert judge(shifted(local, LOGPROB_TOLERANCE * 0.9), local, N)[0] == "pass"


def test_logprob_drift_beyond_the_tolerance_fails():
    local = walk()
    verdict, why = judge(shifted(local, LOGPROB_TOLERANCE * 1.5), local, N)
    assert verdict == "fail" and why.startswith("token 0: logprob")


def test_another_token_fails_unless_the_model_has_a_near_tie_there():
    local = walk()
    assert judge(swapped(local, 5), local, N) == ("fail", "token 5 differs where the model has no near tie")
    tie_late = walk(gaps={MIN_COMPARED + 2: GAP_EPSILON / 2})
    assert judge(swapped(tie_late, MIN_COMPARED + 2), tie_late, N)[0] == "pass"
    tie_early = walk(gaps={2: GAP_EPSILON / 2})
    assert judge(swapped(tie_early, 2), tie_early, N)[0] is None  # too little compared: no verdict


def test_malformed_answers_fail():
    local = walk()
    assert judge(walk(N + 1), local, N)[0] == "fail"
    nan = Answer(local.tokens, (float("nan"),) * N, local.gaps)
    assert judge(nan, local, N)[0] == "fail"
    ragged = Answer(local.tokens, local.logprobs[:3], local.gaps)
    assert judge(ragged, local, N)[0] == "fail"
    assert not agree(ragged, local)


def test_majority_finds_the_odd_one_out():
    honest = walk()
    cheat = shifted(swapped(honest, 0), -0.3)
    assert agree(honest, shifted(honest, LOGPROB_TOLERANCE)) and not agree(honest, cheat)
    assert majority({"a": honest, "b": honest, "c": cheat}) == (["a", "b"], ["c"])
    assert majority({"a": honest, "c": cheat}) is None  # a split vote decides nothing
    assert majority({"a": honest}) is None


def test_honest_answers_that_split_at_a_shared_near_tie_agree():
    a = walk(gaps={3: GAP_EPSILON / 2})
    assert agree(a, swapped(a, 3))
    b = walk()  # no near tie at 3 in b's own report: the split counts against them
    assert not agree(a, swapped(b, 3))
