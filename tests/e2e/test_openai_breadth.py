"""The OpenAI API's breadth on a real node with SmolLM2-135M-Instruct, through the official ``openai`` client:
embeddings (``--embedding-model``), ``n = 2``, prompt arrays, model aliases, and the default model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest

from potluck.inference.resolve import index_copy_path
from tests.conftest import SHARED
from tests.e2e.procs import NodeProcess, offline_env

pytestmark = pytest.mark.e2e

M = "SmolLM2-135M-Instruct.Q4_1"  # the file stem: the id the node serves it under


def smollm2_path() -> Path:
    out = subprocess.run([str(SHARED / "scripts" / "real-models")], capture_output=True, text=True, check=True)
    return Path(dict(line.split(" ", 1) for line in out.stdout.splitlines())["smollm2-q4_1"])


def _env(home: Path) -> dict[str, str]:
    return offline_env(home, POTLUCK_P2P_ENABLED="false", POTLUCK_N_THREADS="1", POTLUCK_N_CTX="1024")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    home = tmp_path_factory.mktemp("breadth")
    smol = str(smollm2_path())
    args = ["--model", smol, "--embedding-model", smol, "--alias", f"gpt-4o-mini={M}"]
    with NodeProcess(home, *args, env=_env(home)) as proc:
        proc.wait_ready()
        yield proc


@pytest.fixture(scope="module")
def client(node):
    return openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _cos(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_embeddings_shape_and_similarity(client):
    texts = ["The cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue grew by five percent."]
    out = client.embeddings.create(model=M, input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in out.data] == [0, 1, 2]
    assert {len(d.embedding) for d in out.data} == {576}  # SmolLM2-135M's hidden size
    cat, kitten, revenue = (d.embedding for d in out.data)
    assert _cos(cat, kitten) > _cos(cat, revenue)
    assert _cos(cat, kitten) > _cos(kitten, revenue)
    assert out.usage.prompt_tokens == out.usage.total_tokens > 0
    floats = client.embeddings.create(model=M, input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, cat, atol=1e-6)


def test_embeddings_token_arrays_and_alias(client):
    text = client.embeddings.create(model="gpt-4o-mini", input="hello world")
    assert text.model == M
    tokens = client.embeddings.create(model=M, input=[[28120, 905]])  # "hello world" in SmolLM2's vocabulary
    assert len(tokens.data) == 1 and len(tokens.data[0].embedding) == 576
    assert tokens.usage.prompt_tokens == 2


def test_embeddings_dimensions_other_than_the_models_is_400(client):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=M, input="x", dimensions=128)
    assert len(client.embeddings.create(model=M, input="x", dimensions=576).data[0].embedding) == 576


def test_chat_n_2_gives_two_different_choices(client):
    messages = [{"role": "user", "content": "Tell me a short story about a dragon."}]
    out = client.chat.completions.create(model=M, messages=messages, n=2, seed=7, temperature=1.0, max_tokens=24)
    assert [c.index for c in out.choices] == [0, 1]
    first, second = (c.message.content for c in out.choices)
    assert first and second and first != second
    again = client.chat.completions.create(model=M, messages=messages, n=2, seed=7, temperature=1.0, max_tokens=24)
    assert [c.message.content for c in again.choices] == [first, second]  # seed + i per choice: reproducible


def test_chat_n_2_streams_both_choices(client):
    stream = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "Name a color."}],
        n=2,
        seed=3,
        temperature=1.0,
        max_tokens=12,
        stream=True,
    )
    text: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert text[0] and text[1]


def test_completions_prompt_array_matches_single_prompts(client):
    prompts = ["The sky is", "Two plus two is"]
    out = client.completions.create(model=M, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices, strict=True):
        single = client.completions.create(model=M, prompt=prompt, max_tokens=8, temperature=0)
        assert choice.text == single.choices[0].text
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=M, prompt=[[1, 2, 3]], max_tokens=4)


def test_alias_resolves_and_unknown_model_lists_what_is_served(client):
    out = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert out.model == M and out.choices[0].message.content
    listed = {m.id: m.owned_by for m in client.models.list().data}
    assert listed["gpt-4o-mini"] == f"alias of {M}" and listed[M] == "local"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="davinci-002", messages=[{"role": "user", "content": "Hi"}])
    assert "davinci-002" in str(err.value) and M in str(err.value) and "gpt-4o-mini" in str(err.value)


def test_node_without_model_serves_the_cached_default_model(tmp_path):
    # What `potluck models pull` leaves behind on a machine without the hub (the index copy; its
    # download is tested in tests/inference/test_default_model.py): the real file, linked into the cache.
    copy = index_copy_path(tmp_path / "cache")
    copy.parent.mkdir(parents=True)
    copy.symlink_to(smollm2_path())
    with NodeProcess(tmp_path, env=_env(tmp_path)) as proc:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [M]
        reply = client.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in reply.choices[0].message.content
        assert "demo model" not in proc.output()
