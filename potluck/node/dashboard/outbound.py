"""Which route a completion took, and what text actually left this node for it.

The API sets, on every completion response::

    X-Potluck-Route: local; target=<this peer ID>        a model loaded here
    X-Potluck-Route: tp; target=<N> ranks                 a tensor-parallel group this node leads
    X-Potluck-Route: peer; target=<peer ID>               forwarded to a swarm peer
    X-Potluck-Route: cloud; target=cloud/<model>          the cloud upstream
    X-Potluck-Sanitized: yes | no                         whether the privacy guard rewrote the text
    X-Potluck-Request-Id: <hex>                           (routes past the guard) key of what was sent

For a route behind the privacy guard (tier >= 2) the request that reaches the guarded route is the
request that leaves: :class:`RouteObserver` wraps that inner route so it records the request it is
handed into a :class:`SentLog`, a small bounded in-memory ring readable at
``GET /api/requests/<id>/sanitized`` (loopback clients only). Nothing is written to disk and the
placeholder mapping never enters it: only the sanitized text, as sent.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from potluck.routing.request import GenerationRequest
from potluck.routing.route import Route, RouteEvent

SENT_LOG_SIZE = 32  # requests whose outbound text is kept (oldest dropped first)


@dataclass(frozen=True)
class SentRequest:
    """What one request sent past the privacy guard (JSON-ready via :meth:`as_dict`)."""

    id: str
    model: str
    destination: str
    sanitized: bool
    messages: tuple[tuple[str, str], ...]  # (role, content) as sent
    prompt: str | None
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "destination": self.destination,
            "sanitized": self.sanitized,
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "prompt": self.prompt,
            "time": self.time,
        }


class SentLog:
    """The last ``size`` outbound requests by id (a bounded ring, in memory only)."""

    def __init__(self, size: int = SENT_LOG_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, SentRequest] = OrderedDict()

    def add(self, item: SentRequest) -> None:
        self._items[item.id] = item
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> SentRequest | None:
        return self._items.get(request_id)

    def __len__(self) -> int:
        return len(self._items)


class _Recording:
    """A route that records each request it is handed, then streams the inner route."""

    def __init__(self, inner: Route, log: SentLog, request_id: str, sanitized: bool) -> None:
        self.inner = inner
        self.tier = getattr(inner, "tier", 3)
        self._log = log
        self._id = request_id
        self._sanitized = sanitized

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        messages = tuple((m.role, m.content) for m in request.messages or ())
        self._log.add(
            SentRequest(self._id, request.model, self.inner.model_id, self._sanitized, messages, request.prompt)
        )
        return self.inner.stream(request)


class RouteObserver:
    """The route to run (recording what leaves, when it is guarded) and its response headers.

    Args:
        route: what the router resolved.
        request: the client's request (its ``X-Potluck-Privacy`` header decides sanitization).
        log: where outbound requests are recorded.
        peer_id: this node's peer ID (the target of a local route).

    Raises:
        RequestError: a bad ``X-Potluck-Privacy`` value on a guarded route.
    """

    def __init__(self, route: Route, request: GenerationRequest, log: SentLog, peer_id: str) -> None:
        from potluck.privacy.guard import GuardedRoute
        from potluck.privacy.policy import PRIVACY_HEADER, Action, decide, parse_level

        self._original = route
        self._peer_id = peer_id
        self.request_id: str | None = None
        self.sanitized = False
        self.route: Route = route
        if isinstance(route, GuardedRoute):
            level = parse_level(request.header(PRIVACY_HEADER), route.guard.default_level)
            self.sanitized = decide(level, route.tier) is not Action.SEND_RAW
            self.request_id = secrets.token_hex(12)
            self.route = GuardedRoute(_Recording(route.inner, log, self.request_id, self.sanitized), route.guard)

    def headers(self) -> dict[str, str]:
        """``X-Potluck-Route`` (+ sanitized, request id); call once the route has started (a peer
        route picks its peer when it starts)."""
        kind, target = describe_route(self._original, self._peer_id)
        headers = {
            "X-Potluck-Route": f"{kind}; target={target}",
            "X-Potluck-Sanitized": "yes" if self.sanitized else "no",
        }
        if self.request_id is not None:
            headers["X-Potluck-Request-Id"] = self.request_id
        return headers


def describe_route(route: Route, peer_id: str) -> tuple[str, str]:
    """``(kind, target)`` of a route: ``local``/``tp``/``peer``/``cloud`` and whom it runs on."""
    from potluck.privacy.guard import GuardedRoute
    from potluck.privacy.provider import CloudRoute

    inner = route.inner if isinstance(route, GuardedRoute) else route
    if isinstance(inner, CloudRoute):
        return "cloud", inner.model_id
    candidates = getattr(inner, "candidates", None)
    if callable(candidates):  # overlay.peer_routes.PeerRoute: the peer it streams from ranks first
        peers = candidates()
        return "peer", str(peers[0]) if peers else "none"
    backend = getattr(getattr(inner, "runner", None), "backend", None)
    group = getattr(backend, "group", None)
    if group is not None:
        return "tp", f"{group.world_size} ranks"
    return "local", peer_id
