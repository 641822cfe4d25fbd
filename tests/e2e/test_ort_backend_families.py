"""``potluck node start --backend onnxruntime`` (the TP engine at N = 1) serving the real Gemma 3
270M (gemma3) and SmolLM2 (llama) GGUFs through the OpenAI API, with the GGUF's chat template,
beside the llama.cpp backend on the same file."""

from __future__ import annotations

import pytest

from tests.e2e.procs import NodeProcess, post_json
from tests.real_models import real_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def answer(tmp_path, model: str, *backend: str) -> str:
    home = tmp_path / (backend[-1] if backend else "llama.cpp")
    with NodeProcess(home, "--model", model, *backend) as node:
        node.wait_ready(180)
        reply = post_json(node.url + "/v1/chat/completions", {"messages": ASK, "temperature": 0, "max_tokens": 10})
    return reply["choices"][0]["message"]["content"]


@pytest.mark.parametrize("name", ["gemma3-q4_k_m", "smollm2-q4_1"])
def test_onnxruntime_backend_chats_like_llama_cpp(tmp_path, name) -> None:
    model = real_model(name)
    ort = answer(tmp_path, model, "--backend", "onnxruntime")
    reference = answer(tmp_path, model)
    # the engines share the template and the first tokens (SmolLM2 Q4_1 answers "L'Étoile, la Cité, ..."
    # in both; the requantized weights make them part after a few words)
    assert ort.split()[:3] == reference.split()[:3], (ort, reference)
    if name.startswith("gemma3"):
        assert "Paris" in ort
