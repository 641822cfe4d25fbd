"""``serve_rate_limit_tps`` paces the tokens streamed to peers one by one (not in the model's bursts)."""

from __future__ import annotations

from potluck.overlay.serving import _per_token
from potluck.routing.route import TextDelta, TokenLogprob


def test_a_burst_is_cut_into_one_delta_per_token():
    pieces = _per_token(TextDelta("Hello, world", 4))
    assert [p.n_tokens for p in pieces] == [1, 1, 1, 1]
    assert "".join(p.text for p in pieces) == "Hello, world"


def test_single_tokens_and_deltas_with_logprobs_stay_whole():
    one = TextDelta("Hi", 1)
    assert _per_token(one) == [one]
    lp = TextDelta("ab", 2, (TokenLogprob("a", -0.1), TokenLogprob("b", -0.2)))
    assert _per_token(lp) == [lp]
    short = TextDelta("", 3)  # tokens that produced no text yet (a partial character)
    assert _per_token(short) == [short]
