"""Which route a completion took, and what text actually left this node for it.

The API sets, on every completion response::

    X-Potluck-Route: <kind>; target=<whom>; key=<candidate>; why="<reason>"
    X-Potluck-Sanitized: yes | no                         whether the privacy guard rewrote the text
    X-Potluck-Request-Id: <hex>                           (routes past the guard) key of what was sent

``X-Potluck-Route`` comes from the router, the source of truth
(:meth:`potluck.routing.plan.PlannedRoute.route_header`): ``kind`` is ``local`` (target: this peer
ID), ``tp`` (a tensor-parallel group this node leads), ``peer`` (target: the peer ID) or ``cloud``
(target: ``cloud/<model>``), for the candidate that produced the first token, and ``why`` its
score, rank and any candidates that failed before it.

For a candidate behind the privacy guard (tier >= 2) the request that reaches the guarded route is the
request that leaves: :class:`RouteObserver` has the router wrap each such inner route so it records
the request it is handed into a :class:`SentLog`, a small bounded in-memory ring readable at
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

from potluck.identity import Tier
from potluck.routing.candidates import Candidate
from potluck.routing.plan import PlannedRoute
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
        self.tier = inner.tier
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
        route: what the router planned (:class:`~potluck.routing.plan.PlannedRoute`).
        request: the client's request (its ``X-Potluck-Privacy`` header decides sanitization).
        log: where outbound requests are recorded.
        peer_id: this node's peer ID.

    Raises:
        RequestError: a bad ``X-Potluck-Privacy`` value.
    """

    def __init__(self, route: PlannedRoute, request: GenerationRequest, log: SentLog, peer_id: str) -> None:
        from potluck.privacy.guard import PrivacyGuard
        from potluck.privacy.policy import PRIVACY_HEADER, parse_level

        policy = route.policy
        default = policy.default_level if isinstance(policy, PrivacyGuard) else "standard"
        self._level = parse_level(request.header(PRIVACY_HEADER), default)
        self._log = log
        self._peer_id = peer_id
        self._ids: dict[str, str] = {}  # candidate key -> request id of what was sent to it
        self.route: PlannedRoute = route
        route.observe = self._record

    def _record(self, candidate: Candidate, inner: Route) -> Route:
        """Record what the router sends to a guarded (tier >= 2) candidate."""
        from potluck.privacy.policy import Action, decide

        if candidate.tier < Tier.COMMUNITY:
            return inner
        request_id = self._ids[candidate.key] = secrets.token_hex(12)
        return _Recording(inner, self._log, request_id, decide(self._level, candidate.tier) is not Action.SEND_RAW)

    def headers(self) -> dict[str, str]:
        """``X-Potluck-Route`` (+ sanitized, request id); call once the route has started (the
        candidate that produced the first event is the one reported)."""
        from potluck.privacy.policy import Action, decide

        chosen = (self.route.chosen or self.route.plan.first).candidate
        guarded = chosen.tier >= Tier.COMMUNITY
        sanitized = guarded and decide(self._level, chosen.tier) is not Action.SEND_RAW
        headers = {
            "X-Potluck-Route": self.route.route_header(self._peer_id),
            "X-Potluck-Sanitized": "yes" if sanitized else "no",
        }
        if guarded and chosen.key in self._ids:
            headers["X-Potluck-Request-Id"] = self._ids[chosen.key]
        return headers
