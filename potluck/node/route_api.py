"""``GET /api/route/explain?model=M``: the router's ranked candidates for a request, with scores.

Query parameters: ``model`` (default: this node's model), ``max_tokens`` (default:
``default_max_tokens``), ``prompt_chars`` (length of the prompt to assume, default 0). The caller's
API key scopes and its ``X-Potluck-Privacy`` / ``X-Potluck-Route-Pin`` headers apply as they would
to a completion. The answer is :meth:`potluck.routing.plan.RoutePlan.as_dict`: every candidate
(``key``, ``kind``, ``target``, ``tier``, ``allowed``, ``refused``/``constraint``, ``score``,
``predicted_ttft_s``, ``predicted_latency_s``, ``tps`` and its source, ``queue``, ``rtt_ms``,
``cost``, ``trust_s``), allowed ones first, best first. ``potluck route explain`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from potluck.errors import RequestError
from potluck.node.auth import caller_scopes
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams
from potluck.routing.router import Router

_EXPLAIN_HEADERS = ("x-potluck-privacy", "x-potluck-route-pin")


def _int_param(request: web.Request, name: str, default: int, most: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(f"query parameter '{name}' must be an integer, not {raw!r}", param=name) from None
    if not 0 <= value <= most:
        raise RequestError(f"query parameter '{name}' must be in 0..{most}, not {value}", param=name)
    return value


def add_routes(app: web.Application, router: Router, default_max_tokens: Callable[[], int]) -> None:
    """Register ``GET /api/route/explain`` on ``app``."""

    async def explain(request: web.Request) -> web.Response:
        unknown = sorted(set(request.query) - {"model", "max_tokens", "prompt_chars"})
        if unknown:
            raise RequestError(f"unknown query parameter '{unknown[0]}'", param=unknown[0])
        max_tokens = _int_param(request, "max_tokens", default_max_tokens(), 1 << 20) or 1
        chars = _int_param(request, "prompt_chars", 0, 1 << 20)
        gen = GenerationRequest(
            model=request.query.get("model", ""),
            params=SamplingParams(max_tokens=max_tokens),
            messages=(ChatMessage("user", "x" * chars),),
            headers=tuple((h, request.headers[h]) for h in _EXPLAIN_HEADERS if h in request.headers),
            scopes=caller_scopes(request),
        )
        plan = await router.plan(gen)
        return web.json_response(plan.as_dict())

    app.router.add_get("/api/route/explain", explain)
