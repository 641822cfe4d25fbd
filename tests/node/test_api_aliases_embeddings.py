"""Model aliases through the HTTP API, and ``/v1/embeddings`` on a node without an embedding model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from potluck.node.embeddings_api import EmbeddingRequest
from potluck.routing.router import Router


async def test_alias_resolves_and_is_listed(scripted_api):
    async with scripted_api() as api:
        api.router.aliases["gpt-4o-mini"] = "scripted"
        resp = await api.http.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["model"] == "scripted"
        listed = {m["id"]: m["owned_by"] for m in (await (await api.http.get("/v1/models")).json())["data"]}
        assert listed == {"scripted": "local", "gpt-4o-mini": "alias of scripted"}


async def test_unknown_model_404_lists_models_and_aliases(scripted_api):
    async with scripted_api() as api:
        api.router.aliases["gpt-4o-mini"] = "scripted"
        resp = await api.http.post("/v1/completions", json={"model": "davinci-002", "prompt": "x"})
        assert resp.status == 404
        message = (await resp.json())["error"]["message"]
        assert "davinci-002" in message and "scripted" in message and "gpt-4o-mini" in message


def test_alias_never_shadows_a_served_model():
    router = Router({"a": "b"})
    assert router.canonical("a") == "b"
    assert router.canonical("other") == "other"


async def test_embeddings_without_embedding_model_says_how(scripted_api):
    async with scripted_api() as api:
        resp = await api.http.post("/v1/embeddings", json={"input": "hello", "model": "scripted"})
        assert resp.status == 400
        assert "--embedding-model" in (await resp.json())["error"]["message"]


async def test_embeddings_unknown_parameter_is_named(scripted_api):
    async with scripted_api() as api:
        resp = await api.http.post("/v1/embeddings", json={"input": "hello", "truncate": True})
        assert resp.status == 400
        assert "'truncate'" in (await resp.json())["error"]["message"]


@pytest.mark.parametrize(
    ("body", "inputs"),
    [
        ({"input": "a"}, ["a"]),
        ({"input": [1, 2]}, [[1, 2]]),
        ({"input": ["a", "b"]}, ["a", "b"]),
        ({"input": [[1], [2, 3]]}, [[1], [2, 3]]),
        ({"input": ["a", [1, 2]]}, ["a", [1, 2]]),  # mixed lists, as llama-server accepts them
    ],
)
def test_embedding_request_inputs(body, inputs):
    assert EmbeddingRequest.model_validate(body).inputs() == inputs


@pytest.mark.parametrize("bad", [[], [[]], [1, "a"], {"content": "x"}, None])
def test_embedding_request_refuses_other_inputs(bad):
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"input": bad})
