"""``token_logprobs`` against a direct numpy log-softmax: values, top-k order, ties, bounds."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.inference.logprobs import MAX_TOP_LOGPROBS, log_softmax, token_logprobs


def _detok(i: int) -> bytes:
    return f"<{i}>".encode()


def _reference(logits: np.ndarray) -> np.ndarray:
    """log softmax the textbook way, in float64: log(exp(x) / sum(exp(x)))."""
    x = logits.astype(np.float64)
    e = np.exp(x - x.max())
    return np.log(e / e.sum())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_and_top_k_match_numpy(seed, dtype):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(4096) * 6).astype(dtype)  # (V,)
    ref = _reference(logits)
    token = int(rng.integers(0, logits.size))
    k = 7

    got = token_logprobs(logits, token, k, _detok)

    assert got.logprob == pytest.approx(ref[token], abs=1e-9)
    assert got.token == f"<{token}>" and got.token_bytes == f"<{token}>".encode()
    want_ids = np.argsort(-ref, kind="stable")[:k]  # most likely first, ties by lower id
    assert [a.token for a in got.top] == [f"<{i}>" for i in want_ids]
    assert [a.logprob for a in got.top] == pytest.approx(ref[want_ids].tolist(), abs=1e-9)
    assert all(x.logprob >= y.logprob for x, y in zip(got.top, got.top[1:], strict=False))
    assert all(a.top == () for a in got.top)  # alternatives carry no alternatives
    assert np.exp(log_softmax(logits)).sum() == pytest.approx(1.0, abs=1e-9)


def test_log_softmax_is_stable_for_large_logits():
    logits = np.array([1e4, 1e4 - 1.0, -1e4])
    got = log_softmax(logits)
    assert np.all(np.isfinite(got))
    assert got[0] - got[1] == pytest.approx(1.0)
    assert got[0] == pytest.approx(-np.log1p(np.exp(-1.0)))


def test_ties_list_lower_ids_first_even_at_the_cut():
    """All-equal logits: the k listed are ids 0..k-1 (the documented tie rule), not any k of them."""
    got = token_logprobs(np.zeros(1000), 3, 5, _detok)
    assert [a.token for a in got.top] == [f"<{i}>" for i in range(5)]
    assert got.logprob == pytest.approx(-np.log(1000))


def test_ties_straddling_the_cut_keep_the_lowest_ids():
    logits = np.zeros(100)
    logits[50] = 1.0
    logits[[90, 60, 20, 7]] = 0.5  # four tied for second place, two places left
    got = token_logprobs(logits, 50, 3, _detok)
    assert [a.token for a in got.top] == ["<50>", "<7>", "<20>"]


def test_k_zero_lists_nothing_and_k_beyond_the_vocabulary_lists_all():
    logits = np.array([0.0, 2.0, 1.0])
    assert token_logprobs(logits, 1, 0, _detok).top == ()
    got = token_logprobs(logits, 1, MAX_TOP_LOGPROBS, _detok)
    assert [a.token for a in got.top] == ["<1>", "<2>", "<0>"]


def test_partial_utf8_piece_keeps_its_bytes():
    piece = "é".encode()[:1]  # half a character: the text gets a replacement character
    got = token_logprobs(np.zeros(4), 0, 0, lambda i: piece)
    assert got.token_bytes == piece and got.token == "\ufffd"


@pytest.mark.parametrize(("token", "k"), [(-1, 0), (4, 0), (0, -1), (0, MAX_TOP_LOGPROBS + 1)])
def test_out_of_range_is_a_value_error(token, k):
    with pytest.raises(ValueError, match="outside"):
        token_logprobs(np.zeros(4), token, k, _detok)
