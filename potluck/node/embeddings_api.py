"""``POST /v1/embeddings``: OpenAI's embeddings endpoint on the node's embedding model.

Body (https://platform.openai.com/docs/api-reference/embeddings/create): ``input`` (a string, a
token array ``list[int]``, or a list of strings and token arrays), ``model`` (the embedding
model's id or an alias of it; empty: the node's embedding model), ``encoding_format`` (``float``,
or ``base64``: the little-endian float32 bytes, as OpenAI's client decodes them), ``dimensions``
(refused with 400 unless it equals the model's size: potluck does not truncate vectors), ``user``.
Any other field is a 400 that names it.

Without an embedding model (``--embedding-model``) the answer is a 400 that says how to load one.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from potluck.errors import ModelLoading, ModelNotFound, Overloaded, RequestError
from potluck.inference.embeddings import EmbeddingEngine

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request

_Tokens = Annotated[list[int], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str | _Tokens | Annotated[list[str | _Tokens], Field(min_length=1, max_length=MAX_INPUTS)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list: one string or token array per vector to return."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [[t for t in self.input if isinstance(t, int)]]
        return [x for x in self.input if not isinstance(x, int)]


@dataclass
class EmbeddingsState:
    """What the handler needs: the engine (``None``: the node has none), the alias lookup, and
    the one worker thread the engine runs on (requests past ``max_queue`` waiting for it: 429)."""

    engine: EmbeddingEngine | None
    canonical: Callable[[str], str]  # model name or alias -> served model name
    max_queue: int = 16
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="potluck-embed")
    )
    waiting: int = 0  # requests submitted and not finished, the running one included


EMBEDDINGS = web.AppKey("embeddings", EmbeddingsState)


def add_routes(
    app: web.Application, engine: EmbeddingEngine | None, canonical: Callable[[str], str], max_queue: int = 16
) -> None:
    """Serve ``POST /v1/embeddings`` on ``app`` from ``engine`` (``canonical``: alias resolution).

    The worker thread belongs to ``app`` and is shut down on its cleanup.
    """
    state = EmbeddingsState(engine, canonical, max_queue)
    app[EMBEDDINGS] = state

    async def _shutdown(_: web.Application) -> None:
        await asyncio.to_thread(state.executor.shutdown, wait=True, cancel_futures=True)

    app.on_cleanup.append(_shutdown)
    app.router.add_post("/v1/embeddings", embeddings)


async def _parse(request: web.Request) -> EmbeddingRequest:
    try:
        return EmbeddingRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(f"malformed JSON body: {first['msg']}") from exc
        loc = [str(p) for p in first["loc"]]
        # A union's errors carry the member type in the path (input.str, input.list[int].0); keep the field.
        where = loc[0] if loc else "body"
        if first["type"] == "extra_forbidden":
            raise RequestError(
                f"unsupported parameter '{where}': /v1/embeddings does not implement it", param=where
            ) from exc
        raise RequestError(f"invalid parameter '{where}': {first['msg']}", param=where) from exc


def _engine_for(state: EmbeddingsState, model: str | None) -> EmbeddingEngine:
    engine = state.engine
    if engine is None:
        raise RequestError(
            "this node serves no embedding model; start it with --embedding-model PATH.gguf "
            "(or set embedding_model in the config file) to use /v1/embeddings"
        )
    if model and state.canonical(model) != engine.model_id:
        raise ModelNotFound(f"model {model!r} is not an embedding model here (embedding models: {engine.model_id})")
    if not engine.loaded:
        raise ModelLoading("the embedding model is still loading; retry in a few seconds")
    return engine


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings`` -> ``{"object": "list", "data": [{"object": "embedding", "index",
    "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``."""
    body = await _parse(request)
    engine = _engine_for(request.app[EMBEDDINGS], body.model)
    if body.dimensions is not None and body.dimensions != engine.n_embd:
        raise RequestError(
            f"invalid parameter 'dimensions': {engine.model_id} returns {engine.n_embd}-dimensional vectors "
            f"and potluck does not shorten them; omit 'dimensions' or pass {engine.n_embd}",
            param="dimensions",
        )
    state = request.app[EMBEDDINGS]
    if state.waiting > state.max_queue:
        raise Overloaded(f"{state.waiting} embedding requests are waiting; retry shortly", retry_after=1.0)
    state.waiting += 1
    try:
        result = await asyncio.get_running_loop().run_in_executor(state.executor, engine.embed, body.inputs())
    finally:
        state.waiting -= 1
    data: list[dict[str, Any]] = [
        {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
        for i, v in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.n_tokens, "total_tokens": result.n_tokens}
    return web.json_response({"object": "list", "data": data, "model": engine.model_id, "usage": usage})
