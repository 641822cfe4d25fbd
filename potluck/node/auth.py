"""Client authentication for the HTTP API: an aiohttp middleware over every route.

Who may call (keys and their grammar: :mod:`potluck.node.keys`):

* **Keys configured** (``--api-key``, ``--api-keys-file`` or ``POTLUCK_API_KEYS``): every route
  needs a valid key, except the open ones: ``/healthz`` and ``/readyz`` always, ``/metrics`` from
  a loopback address. A key is sent as OpenAI clients do, ``Authorization: Bearer <key>``.
  A missing, wrong or revoked key gets 401 (OpenAI's error shape, code ``invalid_api_key``, with
  ``WWW-Authenticate: Bearer``). The caller's scopes are the key's.
* **No keys**, listening on loopback: no key needed; loopback callers get every scope (the
  behaviour before keys existed). A non-loopback address without keys refuses to start
  (:func:`check_bind`) unless ``--no-auth`` is given; then anyone may call, and callers from other
  addresses get no scope (no cloud routes, no privacy override).

The dashboard (a browser: ``EventSource`` cannot send headers) may carry the key instead as
``?key=<key>`` on ``GET /``, ``/static/...`` and ``/api/events``; ``GET /?key=`` answers with a
redirect to ``/`` that sets an ``HttpOnly``, ``SameSite=Strict`` cookie ``potluck_key``, so the key
leaves the address bar and the page's own requests (events, chat, pull) carry the cookie. The
cookie is accepted on every route; the query parameter only on those three.

Per key, a token bucket (its ``rate=`` or the ``api_rate_limit`` setting; default unlimited)
answers 429 with ``Retry-After`` (whole seconds until a request fits) when empty. Every
authenticated request counts, dashboard assets included.

``X-Potluck-Privacy: off`` from a caller without the ``privacy-override`` scope gets 403 here,
whatever the route; the privacy guard checks the same scope again where a request leaves this
node (:mod:`potluck.routing.scopes`). The handlers read the caller with :func:`caller_scopes`
and put the scopes into :attr:`GenerationRequest.scopes
<potluck.routing.request.GenerationRequest.scopes>`, where the router and the guard enforce
``cloud``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from potluck.config import Settings
from potluck.errors import ConfigError
from potluck.node.keys import ApiKey, KeyFile, KeyRing, Rate, parse_keys, parse_rate
from potluck.routing.scopes import ALL_SCOPES, PRIVACY_OVERRIDE

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"
COOKIE = "potluck_key"
QUERY = "key"
PRIVACY_HEADER = "X-Potluck-Privacy"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class Caller:
    """Who sent a request.

    Attributes:
        key_id: the key's short id (:attr:`ApiKey.key_id`), ``None`` when no key was needed.
        scopes: what the caller may do beyond plain completions.
        loopback: the request came from a loopback address.
    """

    key_id: str | None
    scopes: frozenset[str]
    loopback: bool


CALLER = web.RequestKey("potluck_caller", Caller)


def caller_scopes(request: web.Request) -> frozenset[str]:
    """The scopes of ``request``'s caller (none if the middleware did not run: fail closed)."""
    caller = request.get(CALLER)
    return caller.scopes if caller is not None else frozenset()


def is_loopback(address: str | None) -> bool:
    """Is ``address`` (an IP, as aiohttp's ``request.remote`` gives it) a loopback address?"""
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def host_is_loopback(host: str) -> bool:
    """Does listening on ``host`` (an IP or a name) accept only loopback connections?

    ``0.0.0.0``, ``::`` and empty mean every interface; a name counts as loopback only if every
    address it resolves to is one.
    """
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return is_loopback(str(ipaddress.ip_address(host)))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


class TokenBucket:
    """``rate.count`` requests at once, refilled at ``rate.per_s`` per second (Turner's token bucket)."""

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = rate.count
        self.stamp = now

    def take(self, now: float) -> float:
        """Spend one token; returns 0 if there was one, else the seconds until there is one."""
        self.tokens = min(self.rate.count, self.tokens + (now - self.stamp) * self.rate.per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate.per_s


class RateLimiter:
    """One :class:`TokenBucket` per key id; keys without a rate use ``default`` (``None``: unlimited)."""

    def __init__(self, default: Rate | None, clock: Clock = time.monotonic) -> None:
        self.default = default
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: ApiKey) -> float:
        """0 if ``key`` may send a request now, else the seconds until it may."""
        rate = key.rate or self.default
        if rate is None:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(key.key_id)
        if bucket is None or bucket.rate != rate:  # new key, or its rate changed in the file
            bucket = self._buckets[key.key_id] = TokenBucket(rate, now)
        return bucket.take(now)


def _error(status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _dashboard_path(path: str) -> bool:
    return path in ("/", "/api/events") or path.startswith("/static/")


class Authenticator:
    """Decides who may call (module docstring) and provides the middleware.

    Args:
        keys: the accepted keys.
        no_auth: ``--no-auth`` was given (only meaningful without keys).
        limiter: per-key request budgets.
    """

    def __init__(self, keys: KeyRing, no_auth: bool = False, limiter: RateLimiter | None = None) -> None:
        self.keys = keys
        self.no_auth = no_auth
        self.limiter = limiter or RateLimiter(None)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate, rate-limit and scope ``request``, then call ``handler``."""
        path = request.path
        if path in OPEN_PATHS:
            return await handler(request)
        loopback = is_loopback(request.remote)
        via = None
        if not self.keys.configured:
            caller = Caller(None, ALL_SCOPES if loopback else frozenset(), loopback)
        elif path == METRICS_PATH and loopback:
            return await handler(request)
        else:
            found = self._authenticate(request, loopback)
            if isinstance(found, web.Response):
                return found
            caller, via = found
        if not self._privacy_allowed(request, caller):
            return _error(
                403,
                f"{PRIVACY_HEADER}: off needs the '{PRIVACY_OVERRIDE}' scope on the API key",
                "permission_error",
                "scope_required",
            )
        request[CALLER] = caller
        if via == "query" and path == "/" and request.method == "GET":
            redirect = web.Response(status=303, headers={"Location": "/"})  # the key leaves the address bar
            redirect.set_cookie(COOKIE, request.query[QUERY], httponly=True, samesite="Strict", path="/")
            return redirect
        return await handler(request)

    def _authenticate(self, request: web.Request, loopback: bool) -> tuple[Caller, str] | web.Response:
        presented, via = self._presented(request)
        if presented is None:
            return _unauthorized(
                "no API key: send it as 'Authorization: Bearer <key>' (the dashboard: open /?key=<key>)", via
            )
        key = self.keys.lookup(presented)
        if key is None:
            log.info("refused a request with an unknown or revoked API key from %s", request.remote)
            return _unauthorized("incorrect or revoked API key", via)
        wait = self.limiter.take(key)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            return _error(
                429,
                f"rate limit of API key {key.name!r} exceeded; retry in {retry} s",
                "rate_limit_error",
                "rate_limit_exceeded",
                {"Retry-After": str(retry)},
            )
        return Caller(key.key_id, key.scopes, loopback), via

    @staticmethod
    def _presented(request: web.Request) -> tuple[str | None, str]:
        """The key the request carries and how: ``header``, ``cookie`` or ``query``."""
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None, "malformed-header"
            return token.strip(), "header"
        cookie = request.cookies.get(COOKIE)
        if cookie:
            return cookie, "cookie"
        if request.method == "GET" and _dashboard_path(request.path) and request.query.get(QUERY):
            return request.query[QUERY], "query"
        return None, "none"

    @staticmethod
    def _privacy_allowed(request: web.Request, caller: Caller) -> bool:
        value = request.headers.get(PRIVACY_HEADER, "")
        return value.strip().lower() != "off" or PRIVACY_OVERRIDE in caller.scopes


def _unauthorized(message: str, via: str) -> web.Response:
    if via == "malformed-header":
        message = "the Authorization header must be 'Bearer <key>'"
    return _error(401, message, "invalid_request_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})


def check_bind(host: str, keys: KeyRing, no_auth: bool) -> None:
    """Refuse to serve a non-loopback address without keys, unless ``--no-auth`` says so.

    Raises:
        ConfigError: ``host`` is not loopback-only, no key is configured and ``no_auth`` is off;
            or ``no_auth`` is on while keys are configured (contradictory).
    """
    if no_auth and keys.configured:
        raise ConfigError("--no-auth contradicts the API keys given (--api-key, --api-keys-file, POTLUCK_API_KEYS)")
    if keys.configured or no_auth or host_is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve the API on {host!r} without an API key: anyone who can reach it could use "
        "this node, the swarm and its cloud key. Give --api-key KEY (or --api-keys-file FILE, or "
        "POTLUCK_API_KEYS), or --no-auth to serve it unauthenticated"
    )


def authenticator_from_settings(settings: Settings, clock: Clock = time.monotonic) -> Authenticator:
    """The node's :class:`Authenticator`: keys from ``api_keys`` and ``api_keys_file``, bind checked.

    Raises:
        ConfigError: a malformed key entry or keys file, a bad ``api_rate_limit``, or a bind
            :func:`check_bind` refuses.
    """
    fixed = parse_keys((k.get_secret_value() for k in settings.api_keys), "api key")
    file = KeyFile(settings.api_keys_file) if settings.api_keys_file is not None else None
    ring = KeyRing(fixed, file)
    check_bind(settings.host, ring, settings.no_auth)
    default = parse_rate(settings.api_rate_limit, "api_rate_limit") if settings.api_rate_limit else None
    if ring.configured:
        n = len(fixed) + len(file.keys() if file is not None else [])
        log.info(
            "API keys required: %d key(s)%s", n, f" ({settings.api_keys_file}, reloaded on change)" if file else ""
        )
    elif settings.no_auth:
        log.warning("--no-auth: the API on %s is open to anyone who can reach it", settings.host)
    return Authenticator(ring, settings.no_auth, RateLimiter(default, clock))
