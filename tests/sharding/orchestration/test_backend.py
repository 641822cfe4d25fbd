"""The ONNX Runtime backend (N = 1) behind the Backend protocol, and the factory hook."""

from __future__ import annotations

import threading

import pytest

from potluck.config import Settings
from potluck.errors import ModelFileError, RequestError
from potluck.inference.backend import Backend
from potluck.node.backends import create_backend
from potluck.routing.request import ChatMessage, SamplingParams
from potluck.sharding.orchestration.ort_backend import OnnxRuntimeBackend
from tests.sharding.llama_ref import STEADY_PROMPT, greedy_tokens


@pytest.fixture
def backend(model_path):
    b = create_backend(Settings(backend="onnxruntime", n_ctx=256), model_path("q4_0"))
    b.load()
    yield b
    b.close()


def test_factory_builds_the_onnxruntime_backend(backend) -> None:
    assert isinstance(backend, OnnxRuntimeBackend)
    assert isinstance(backend, Backend)
    assert backend.info.architecture == "llama" and backend.info.n_ctx == 256


def test_generate_streams_text_and_matches_token_ids(backend, model_path) -> None:
    ids, _ = greedy_tokens(model_path("q4_0"))
    assert backend.tokenize(STEADY_PROMPT) == ids
    out = list(backend.generate(STEADY_PROMPT, SamplingParams(max_tokens=16, temperature=0.0), threading.Event()))
    assert 1 <= len(out) <= 16
    assert "".join(t.text for t in out).strip()


def test_seeded_sampling_is_reproducible_and_cancel_stops(backend) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=5)
    a = [t.token_id for t in backend.generate("KING:", params, threading.Event())]
    b = [t.token_id for t in backend.generate("KING:", params, threading.Event())]
    assert a == b
    cancel = threading.Event()
    seen = []
    for tok in backend.generate("KING:", SamplingParams(max_tokens=50, temperature=0.0), cancel):
        seen.append(tok)
        cancel.set()
    assert len(seen) == 1


def test_chat_template_fallback_and_context_limit(backend) -> None:
    prompt = backend.render_chat([ChatMessage("user", "Hello")])
    assert prompt.prompt.endswith("Assistant:")
    with pytest.raises(RequestError):
        list(backend.generate("word " * 400, SamplingParams(max_tokens=4), threading.Event()))


def test_bad_file_is_rejected(tmp_path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(ModelFileError):
        OnnxRuntimeBackend(bad, "x")
