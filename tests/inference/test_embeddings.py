"""The embedding engine on real llama.cpp: SmolLM2-135M-Instruct (mean-pooled) and a fixture GGUF."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from potluck.errors import RequestError
from potluck.inference.embeddings import POOLING_MEAN, EmbeddingEngine, gguf_pooling
from tests.conftest import SHARED


def smollm2_path() -> Path:
    out = subprocess.run([str(SHARED / "scripts" / "real-models")], capture_output=True, text=True, check=True)
    return Path(dict(line.split(" ", 1) for line in out.stdout.splitlines())["smollm2-q4_1"])


@pytest.fixture(scope="module")
def engine():
    engine = EmbeddingEngine(smollm2_path(), "smol", n_ctx=256, n_threads=1)
    engine.load()
    yield engine
    engine.close()


def test_causal_lm_without_pooling_metadata_is_mean_pooled(model_path):
    pooling, reason = gguf_pooling(smollm2_path(), "llama")
    assert pooling == POOLING_MEAN and "no pooling type" in reason
    assert gguf_pooling(model_path("q4_0"), "llama")[0] == POOLING_MEAN


def test_vectors_are_unit_length_and_similar_texts_score_closer(engine):
    texts = ["The cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue grew by five percent."]
    result = engine.embed(texts)
    v = np.array(result.vectors)  # (3, 576)
    assert v.shape == (3, engine.n_embd) == (3, 576)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]
    assert result.n_tokens == sum(len(engine.tokenize(t)) for t in texts)


def test_token_arrays_embed_like_their_text(engine):
    text = "Potluck shares models."
    by_text, by_tokens = engine.embed([text, engine.tokenize(text)]).vectors
    assert np.allclose(by_text, by_tokens, atol=1e-6)


@pytest.mark.parametrize(
    ("item", "words"),
    [("", "must not be empty"), ([49152], "outside the vocabulary"), ([1] * 300, "the embedding context holds 256")],
)
def test_bad_inputs_name_their_position(engine, item, words):
    with pytest.raises(RequestError, match=rf"input\[1\].*{words}"):
        engine.embed(["fine", item])
