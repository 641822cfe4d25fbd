"""The llama.cpp backend on real fixture GGUFs and the generated demo model."""

from __future__ import annotations

import threading

import pytest

from potluck.errors import RequestError
from potluck.inference.backend import Backend
from potluck.inference.chat import render_plain_chat
from potluck.inference.demo_model import demo_model_path
from potluck.inference.llamacpp import LlamaCppBackend
from potluck.routing.request import ChatMessage, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def tokens(backend: Backend, prompt: str, params: SamplingParams, cancel=None) -> list[int]:
    return [t.token_id for t in backend.generate(prompt, params, cancel or threading.Event())]


@pytest.fixture(scope="module")
def f16(request):
    from tests.conftest import MODELS

    backend = LlamaCppBackend(MODELS / "tinyshakespeare-f16.gguf", "ts-f16", n_ctx=256)
    backend.load()
    yield backend
    backend.close()


def test_backend_satisfies_protocol_and_reports_info(f16):
    assert isinstance(f16, Backend)
    info = f16.info
    assert (info.architecture, info.n_layers, info.quantization, info.n_ctx) == ("llama", 4, "F16", 256)


def test_greedy_matches_llama_cpp_called_directly(f16, model_path):
    from llama_cpp import Llama

    prompt = "ROMEO:\nBut soft, what light"
    ours = tokens(f16, prompt, GREEDY)
    direct = Llama(str(model_path("f16")), n_ctx=256, verbose=False)
    ref = direct.create_completion(prompt, max_tokens=24, temperature=0.0)
    assert len(ours) == 24
    text = "".join(t.text for t in f16.generate(prompt, GREEDY, threading.Event()))
    assert text == ref["choices"][0]["text"]


def test_cancel_stops_generation(f16):
    cancel = threading.Event()
    out = []
    for tok in f16.generate("ROMEO:", SamplingParams(max_tokens=200, temperature=1.0), cancel):
        out.append(tok)
        if len(out) == 3:
            cancel.set()
    assert len(out) == 3


def test_prompt_over_context_is_request_error(f16):
    with pytest.raises(RequestError, match="context"):
        list(f16.generate("word " * 400, GREEDY, threading.Event()))


def test_plain_chat_template_for_models_without_one(f16):
    chat = f16.render_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert chat == render_plain_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")])
    assert chat.prompt.endswith("Assistant:") and "User: Hi" in chat.prompt and "\nUser:" in chat.stop


def test_demo_model_is_deterministic_and_loads_in_llama_cpp(tmp_path):
    first = demo_model_path(tmp_path / "a")
    second = demo_model_path(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert 2_000_000 < first.stat().st_size < 10_000_000
    backend = LlamaCppBackend(first, "demo", n_ctx=512)
    backend.load()
    try:
        text = "".join(t.text for t in backend.generate("héllo wörld", GREEDY, threading.Event()))
        assert text  # random weights, but real tokens through real llama.cpp
        ids = backend.tokenize("héllo")
        assert ids[0] == 1 and len(ids) > 5  # BOS + byte-level tokens
    finally:
        backend.close()


def test_chat_template_from_gguf_metadata_is_used(tmp_path):
    from potluck.inference.demo_model import write_demo_model

    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = write_demo_model(tmp_path / "templated.gguf", chat_template=template)
    backend = LlamaCppBackend(path, "templated", n_ctx=512)
    backend.load()
    try:
        chat = backend.render_chat([ChatMessage("user", "hi")])
        assert chat.prompt == "<|user|>hi</s><|assistant|>"
        assert "</s>" in chat.stop
        assert "".join(t.text for t in backend.generate(chat.prompt, GREEDY, threading.Event()))
    finally:
        backend.close()
