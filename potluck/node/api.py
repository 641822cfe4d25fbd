"""The node's HTTP API: OpenAI-compatible completions plus node endpoints.

Routes::

    GET  /v1/models             models reachable from this node (local first)
    POST /v1/chat/completions   chat, streaming (SSE, ``data: [DONE]``) or not
    POST /v1/completions        text completion, streaming or not
    POST /v1/responses          OpenAI Responses API, basic text subset (:mod:`potluck.node.responses_api`)
    POST /v1/embeddings         vectors from the embedding model (:mod:`potluck.node.embeddings_api`)
    GET  /healthz               liveness (200 while the process serves HTTP) and model loading state
    GET  /readyz                readiness: 200 once the model is loaded and the overlay is up, else 503
                                with ``{"status": "starting", "pending": ["model", "overlay"], ...}``
    GET  /metrics               Prometheus metrics
    GET  /api/node              peer ID, version, uptime, models, queue depth
    GET  /api/route/explain     the router's ranked candidates for ?model=M (:mod:`potluck.node.route_api`)
    GET  /, /api/events ...     the web dashboard (:mod:`potluck.node.dashboard`), when the node has one

Completion responses carry ``X-Potluck-Route`` (and ``X-Potluck-Sanitized``, ``X-Potluck-Request-Id``):
where the request ran and whether its text was sanitized (:mod:`potluck.node.dashboard.outbound`).

Chat takes ``response_format`` (JSON object / JSON schema, enforced with a llama.cpp grammar,
:mod:`potluck.node.structured`), ``tools`` + ``tool_choice`` (:mod:`potluck.node.tool_calls`) and
``logprobs``/``top_logprobs``; completions take ``logprobs``. A route that cannot apply one of
them answers 400 naming it; so does any parameter potluck does not know (:mod:`potluck.node.schemas`).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with status
400 (malformed JSON, bad parameters), 404 (unknown model or path), 413 (body too large), 429
(queue full, with ``Retry-After``), 503 (model loading, with ``Retry-After``). A failure after a
stream has started is sent as a final ``data: {"error": ...}`` event.

Every route except ``/healthz`` and ``/readyz`` (and ``/metrics`` from loopback) needs an API key
when keys are configured: 401 without a valid one, 429 with ``Retry-After`` past its rate, 403
when its scopes do not allow the request (:mod:`potluck.node.auth`, applied app-wide).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from pydantic import BaseModel, ValidationError

from potluck import __version__
from potluck.config import Settings
from potluck.errors import (
    GenerationError,
    ModelLoading,
    ModelNotFound,
    NetworkError,
    Overloaded,
    PolicyRefused,
    PotluckError,
    PrivacyError,
    RequestError,
    ScopeRefused,
)
from potluck.inference.embeddings import EmbeddingEngine
from potluck.node import embeddings_api, responses_api, route_api
from potluck.node.auth import Authenticator, caller_scopes
from potluck.node.choices import MAX_CHOICES, ChoiceContext, complete_choices, fan_out
from potluck.node.dashboard import Dashboard
from potluck.node.dashboard.outbound import RouteObserver, SentLog
from potluck.node.keys import KeyRing
from potluck.node.metrics import NodeMetrics
from potluck.node.openai_chat import Calls, Content, Shaper, ToolMode, collect, pieces
from potluck.node.schemas import ChatCompletionRequest, CompletionRequest
from potluck.node.structured import response_format_grammar, tool_grammar, tools_json
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, Route, TextDelta
from potluck.routing.router import Router

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("x-potluck-privacy", "x-potluck-route-pin")


@dataclass
class ApiState:
    """What the handlers need, passed in explicitly (``app[API_STATE]``)."""

    settings: Settings
    router: Router
    metrics: NodeMetrics
    peer_id: str
    started_at: float  # time.monotonic()
    cluster: Callable[[], dict[str, Any]] | None = None  # the overlay's state view, when it runs
    overlay_up: Callable[[], bool] | None = None  # is the overlay up? (``None``: it is disabled)
    sent: SentLog = field(default_factory=SentLog)  # text sent past the privacy guard (dashboard)
    dashboard: Dashboard | None = None  # the web dashboard's routes (``/``, ``/api/events``...)
    auth: Authenticator | None = None  # API keys (:mod:`potluck.node.auth`); ``None``: no keys, loopback callers
    embedder: EmbeddingEngine | None = None  # ``/v1/embeddings`` (``--embedding-model``), when loaded for it


API_STATE = web.AppKey("api_state", ApiState)

# (status, OpenAI error type, code) per exception class, most specific first.
_ERROR_MAP: list[tuple[type[Exception], int, str, str | None]] = [
    (RequestError, 400, "invalid_request_error", None),
    (ModelNotFound, 404, "invalid_request_error", "model_not_found"),
    (Overloaded, 429, "rate_limit_error", "queue_full"),
    (ModelLoading, 503, "service_unavailable", "model_loading"),
    (PolicyRefused, 403, "privacy_error", "policy_refused"),
    (ScopeRefused, 403, "permission_error", "scope_required"),
    (PrivacyError, 500, "privacy_error", "sanitization_failed"),
    (NetworkError, 502, "upstream_error", None),
    (GenerationError, 500, "server_error", None),
    (PotluckError, 500, "server_error", None),
]


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: PotluckError) -> web.Response:
    """The OpenAI-shaped HTTP error for a potluck exception."""
    for cls, status, type_, code in _ERROR_MAP:
        if isinstance(exc, cls):
            headers = {}
            if isinstance(exc, Overloaded):
                headers["Retry-After"] = str(max(1, round(exc.retry_after)))
            elif isinstance(exc, ModelLoading):
                headers["Retry-After"] = "2"
            param = exc.param if isinstance(exc, RequestError) else None
            return web.json_response(error_body(str(exc), type_, code, param), status=status, headers=headers)
    raise AssertionError("unreachable: PotluckError is in the map")


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Translate exceptions into OpenAI-shaped errors and count every request."""
    state = request.app[API_STATE]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
    try:
        response = await handler(request)
    except PotluckError as exc:
        response = error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        response = web.json_response(
            error_body(
                f"request body is larger than {state.settings.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            ),
            status=413,
        )
        log.info("rejected oversized body: %s", exc.text)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = web.json_response(
            error_body(f"{exc.reason}: {request.method} {request.path}", "invalid_request_error"),
            status=exc.status,
        )
    state.metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    body = await request.read()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(f"malformed JSON body: {first['msg']}") from exc
        where = ".".join(str(p) for p in first["loc"]) or "body"
        if first["type"] == "extra_forbidden":
            raise RequestError(f"unsupported parameter '{where}'", param=where) from exc
        raise RequestError(f"invalid parameter '{where}': {first['msg']}", param=where) from exc


def _headers(request: web.Request) -> tuple[tuple[str, str], ...]:
    return tuple((h, request.headers[h]) for h in FORWARDED_HEADERS if h in request.headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
    state = request.app[API_STATE]
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    fmt_grammar = response_format_grammar(body.response_format)
    call_grammar = tool_grammar(body.tools, body.tool_choice)
    if fmt_grammar is not None and call_grammar is not None:
        raise RequestError("'response_format' cannot be combined with a forced 'tool_choice'", param="response_format")
    tools = tools_json(body.tools, body.tool_choice)
    params = replace(
        body.sampling(state.settings.default_max_tokens),
        grammar=fmt_grammar or call_grammar,
        logprobs=body.logprobs_k,
    )
    gen = GenerationRequest(
        model=body.model or "",
        params=params,
        messages=tuple(m.to_message() for m in body.messages),
        headers=_headers(request),
        tools=tools,
    )
    mode = None
    if tools is not None and body.tools:
        mode = ToolMode(frozenset(t.function.name for t in body.tools), forced=call_grammar is not None)
    grammar_param = "tool_choice" if call_grammar is not None else "response_format"
    if body.n > 1:
        ctx = _choice_context(request, grammar_param)
        choices = fan_out([gen], body.n)
        return await complete_choices(
            request, ctx, choices, stream=body.stream, chat=True, include_usage=_include_usage(body), tools=mode
        )
    return await _complete(
        request,
        gen,
        body.stream,
        chat=True,
        include_usage=_include_usage(body),
        tools=mode,
        grammar_param=grammar_param,
    )


async def completions(request: web.Request) -> web.StreamResponse:
    body: CompletionRequest = await _parse(request, CompletionRequest)
    state = request.app[API_STATE]
    prompts = body.prompt_texts
    if len(prompts) * body.n > MAX_CHOICES:
        raise RequestError(f"at most {MAX_CHOICES} choices per request ('n' times the number of prompts)", param="n")
    if len(prompts) > 1 or body.n > 1:
        params = replace(body.sampling(state.settings.default_max_tokens), logprobs=body.logprobs)
        gens = [GenerationRequest(body.model or "", params, prompt=p, headers=_headers(request)) for p in prompts]
        choices = fan_out(gens, body.n, prompts if body.echo else ())
        ctx = _choice_context(request)
        return await complete_choices(
            request, ctx, choices, stream=body.stream, chat=False, include_usage=_include_usage(body)
        )
    gen = GenerationRequest(
        model=body.model or "",
        params=replace(body.sampling(state.settings.default_max_tokens), logprobs=body.logprobs),
        prompt=body.prompt_text,
        headers=_headers(request),
    )
    echo = body.prompt_text if body.echo else ""
    return await _complete(request, gen, body.stream, chat=False, include_usage=_include_usage(body), echo=echo)


def _choice_context(request: web.Request, grammar_param: str = "response_format") -> ChoiceContext:
    """How :mod:`potluck.node.choices` opens routes, shapes errors and counts cancellations here."""
    state = request.app[API_STATE]
    return ChoiceContext(
        open=lambda gen: open_route(request, gen, grammar_param),
        error_json=lambda exc: json.loads(error_response(exc).text or "{}"),
        on_cancel=state.metrics.cancelled.inc,
    )


def check_route(route: Route, gen: GenerationRequest, grammar_param: str = "response_format") -> None:
    """Refuse, naming the client's parameter, what a route declares it cannot apply.

    Routes with a ``features`` attribute (local models, :class:`potluck.inference.route.LoadedModelRoute`)
    are checked here; others (peers, the cloud) refuse remotely or in their own client.

    Raises:
        RequestError: ``grammar_param`` (``response_format`` / ``tool_choice``) or ``logprobs``.
    """
    features = getattr(route, "features", None)
    if features is None:
        return
    if gen.params.grammar is not None and "grammar" not in features:
        raise RequestError(
            f"'{grammar_param}' needs grammar-constrained sampling, which the route to "
            f"{route.model_id!r} does not support",
            param=grammar_param,
        )
    if gen.params.logprobs is not None and "logprobs" not in features:
        raise RequestError(f"'logprobs' is not supported by the route to {route.model_id!r}", param="logprobs")


async def open_route(
    request: web.Request, gen: GenerationRequest, grammar_param: str = "response_format"
) -> tuple[RouteObserver, AsyncGenerator[TextDelta | Finished, None]]:
    """Resolve ``gen``'s route, check it can apply the request, and start its observed events."""
    state = request.app[API_STATE]
    gen = replace(gen, scopes=caller_scopes(request))  # what the caller's API key allows (cloud, privacy)
    route = await state.router.route(gen)  # ranked candidates with failover (potluck.routing.plan)
    check_route(route, gen, grammar_param)
    observer = RouteObserver(route, gen, state.sent, state.peer_id)
    events = _observed(observer.route.stream(gen), state.metrics, observer.route.model_id, time.perf_counter())
    return observer, _grammar_param(events, grammar_param)


async def _grammar_param(
    events: AsyncGenerator[TextDelta | Finished, None], grammar_param: str
) -> AsyncGenerator[TextDelta | Finished, None]:
    """Name the client's parameter in a route's grammar refusal (a route only knows ``grammar``)."""
    async with aclosing(events) as it:
        try:
            async for event in it:
                yield event
        except RequestError as exc:
            if exc.param in ("response_format", "grammar"):
                exc.param = grammar_param
            raise


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _default_max_tokens(request: web.Request) -> int:
    return request.app[API_STATE].settings.default_max_tokens


def _usage(done: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _complete(
    request: web.Request,
    gen: GenerationRequest,
    stream: bool,
    *,
    chat: bool,
    include_usage: bool,
    echo: str = "",
    tools: ToolMode | None = None,
    grammar_param: str = "response_format",
) -> web.StreamResponse:
    state = request.app[API_STATE]
    observer, raw_events = await open_route(request, gen, grammar_param)
    shaper = Shaper(chat, observer.route.model_id, logprobs=gen.params.logprobs is not None)
    metrics = state.metrics
    events = pieces(raw_events, tools)
    if not stream:
        text, calls, lps, done = await collect(events)
        body = shaper.whole(echo + text, done.finish_reason, _usage(done), calls, lps)
        return web.json_response(body, headers=observer.headers())

    # Pull the first event before sending headers, so early errors (queue full, bad prompt)
    # still get their proper status code.
    async with aclosing(events) as it:
        first = await anext(it)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        response.headers.update(observer.headers())
        await response.prepare(request)
        try:
            await _send(response, shaper.chunk(echo if echo or chat else None, None, first=True))
            event = first
            finish_calls = False
            while True:
                if isinstance(event, Content):
                    await _send(response, shaper.chunk(event.text, None, logprobs=event.logprobs))
                elif isinstance(event, Calls):
                    finish_calls = True
                    for chunk in shaper.call_chunks(event.calls):
                        await _send(response, chunk)
                else:
                    await _send(response, shaper.chunk(None, "tool_calls" if finish_calls else event.finish_reason))
                    if include_usage:
                        await _send(response, shaper.usage_chunk(_usage(event)))
                    break
                event = await anext(it)
            await response.write(b"data: [DONE]\n\n")
        except (ClientConnectionResetError, ConnectionResetError):
            metrics.cancelled.inc()
            log.info("client went away; generation cancelled")
            return response
        except PotluckError as exc:
            log.warning("stream failed after it started: %s", exc)
            body = json.loads(error_response(exc).text or "{}")
            await _send(response, body)
            return response
    return response


async def _send(response: web.StreamResponse, obj: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")


async def _observed(
    events: AsyncGenerator[TextDelta | Finished, None], metrics: NodeMetrics, model: str, t0: float
) -> AsyncGenerator[TextDelta | Finished, None]:
    """Pass events through, recording TTFT, latency and token counts."""
    first = True
    async with aclosing(events) as it:
        async for event in it:
            if first and isinstance(event, TextDelta):
                metrics.ttft.labels(model).observe(time.perf_counter() - t0)
                first = False
            if isinstance(event, Finished):
                metrics.latency.labels(model).observe(time.perf_counter() - t0)
                metrics.tokens_generated.labels(model).inc(event.completion_tokens)
                metrics.prompt_tokens.labels(model).inc(event.prompt_tokens)
            yield event


async def list_models(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    data = [{"id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by} for m in state.router.listings()]
    embedder = state.embedder
    if embedder is not None and all(d["id"] != embedder.model_id for d in data):  # a separate embedding model
        data.append({"id": embedder.model_id, "object": "model", "created": 0, "owned_by": "local"})
    return web.json_response({"object": "list", "data": data})


def _local_models(router: Router) -> list[dict[str, Any]]:
    return [asdict(r.info) for r in router.local_routes]


async def healthz(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    ready = bool(state.router.local_routes)
    return web.json_response({"status": "ok" if ready else "loading", "peer_id": state.peer_id})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 once every component serves, else 503 naming what is still pending.

    ``model``: the node's model is loaded (none still loading). ``overlay``: the libp2p host and
    the swarm loops run (``off`` and never pending when p2p is disabled).
    """
    state = request.app[API_STATE]
    model = "loading" if state.router.loading or not state.router.local_routes else "loaded"
    overlay = "off" if state.overlay_up is None else "up" if state.overlay_up() else "starting"
    pending = [name for name, ok in (("model", model == "loaded"), ("overlay", overlay != "starting")) if not ok]
    body = {
        "status": "starting" if pending else "ready",
        "pending": pending,
        "model": model,
        "overlay": overlay,
        "peer_id": state.peer_id,
    }
    if pending:
        return web.json_response(body, status=503, headers={"Retry-After": "1"})
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    return web.Response(body=state.metrics.render(), headers={"Content-Type": state.metrics.content_type})


async def node_info(request: web.Request) -> web.Response:
    state = request.app[API_STATE]
    routes = state.router.local_routes
    return web.json_response(
        {
            "peer_id": state.peer_id,
            "version": __version__,
            "uptime_s": time.monotonic() - state.started_at,
            "models": _local_models(state.router),
            "queue_depth": sum(r.queue_depth for r in routes),
            "active_requests": sum(r.active for r in routes),
        }
    )


async def cluster_info(request: web.Request) -> web.Response:
    """``GET /api/cluster``: the swarm's signed-state view as this node sees it."""
    state = request.app[API_STATE]
    if state.cluster is None:
        body = error_body("this node runs without the overlay (p2p disabled)", "not_found")
        return web.json_response(body, status=404)
    return web.json_response(state.cluster())


def build_app(state: ApiState) -> web.Application:
    """The aiohttp application serving the API for ``state``."""
    auth = state.auth or Authenticator(KeyRing())
    app = web.Application(
        client_max_size=state.settings.max_body_bytes, middlewares=[errors_middleware, auth.middleware]
    )
    app[API_STATE] = state
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    responses_api.add_routes(app, responses_api.Generation(open_route, _parse, _headers, _default_max_tokens))
    embeddings_api.add_routes(app, state.embedder, state.router.canonical, state.settings.max_queue)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/node", node_info)
    app.router.add_get("/api/cluster", cluster_info)
    route_api.add_routes(app, state.router, lambda: state.settings.default_max_tokens)
    if state.dashboard is not None:
        state.dashboard.add_routes(app)
    return app
