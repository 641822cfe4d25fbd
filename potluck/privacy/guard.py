"""The privacy guard: every route to tier >= 2 goes through it.

:class:`PrivacyGuard` wraps a :class:`~potluck.routing.route.Route` whose ``tier`` is 2 (community
peers) or 3 (cloud). Per request it

1. reads the privacy level (``X-Potluck-Privacy`` header, else the node's ``privacy`` setting);
2. sanitizes every message (and the prompt, the stop strings and the ``continuation`` of a resumed
   request) with one placeholder mapping, in a worker thread; ``strict`` refuses if anything
   sensitive was found;
3. writes the audit record, then sends the sanitized request to the inner route;
4. restores placeholders in the streamed reply (:class:`~potluck.privacy.restore.StreamRestorer`).

Fail closed: if the sanitizer cannot be built, detection raises, or the audit record cannot be
written, the inner route is never called and the client gets :class:`~potluck.errors.PrivacyError`.

It is applied in one place: the node hands it to the router as its
:class:`~potluck.routing.constraints.RoutePolicy`, and the router's planned route wraps every
candidate of tier >= 2 (:mod:`potluck.routing.plan`); :meth:`PrivacyGuard.refusal` is the policy's
hard constraint, asked before any candidate is ranked::

    guard = PrivacyGuard(AuditLog.in_data_dir(settings.data_dir), settings.privacy)
    router.planner.policy = guard
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING

from potluck.errors import PolicyRefused, PrivacyError
from potluck.identity import Tier
from potluck.privacy.audit import AuditLog, AuditRecord
from potluck.privacy.policy import PRIVACY_HEADER, Action, PrivacyLevel, decide, enforce_strict, parse_level
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Finished, Route, RouteEvent, TextDelta, TokenLogprob
from potluck.routing.scopes import require_route_scopes

if TYPE_CHECKING:
    from potluck.privacy.sanitizer import Sanitized, Sanitizer

log = logging.getLogger(__name__)


def _default_sanitizer() -> Sanitizer:
    from potluck.privacy.sanitizer import Sanitizer  # presidio and the word lists load here, once

    return Sanitizer()


class PrivacyGuard:
    """Applies the privacy policy to routes of tier >= 2 (see module docstring).

    Args:
        audit: where outbound requests are recorded (``None``: no audit file, tests only).
        default_level: the level when a request has no ``X-Potluck-Privacy`` header.
        sanitizer_factory: builds the sanitizer on first use (about a second; off the event loop).
    """

    def __init__(
        self,
        audit: AuditLog | None,
        default_level: PrivacyLevel = "standard",
        sanitizer_factory: Callable[[], Sanitizer] | None = None,
    ) -> None:
        self.audit = audit
        self.default_level = default_level
        self._factory = sanitizer_factory or _default_sanitizer
        self._sanitizer: Sanitizer | None = None
        self._lock = asyncio.Lock()

    async def sanitizer(self) -> Sanitizer:
        """The shared sanitizer, built on first use in a worker thread.

        Raises:
            PrivacyError: it cannot be built.
        """
        async with self._lock:
            if self._sanitizer is None:
                try:
                    self._sanitizer = await asyncio.to_thread(self._factory)
                except PrivacyError:
                    raise
                except Exception as exc:
                    raise PrivacyError(f"cannot set up the sanitizer ({type(exc).__name__}); nothing was sent") from exc
            return self._sanitizer

    def wrap(self, route: Route) -> Route:
        """``route`` itself if its tier is <= 1, else a guarded route."""
        return route if route.tier <= Tier.OWN else GuardedRoute(route, self)

    async def refusal(self, request: GenerationRequest, tier: Tier) -> str | None:
        """Why ``request`` may not go to ``tier`` at all, or ``None`` (the router's hard constraint,
        :class:`~potluck.routing.constraints.RoutePolicy`).

        Level ``strict`` with sensitive content (detected here, in a worker thread), and tools (their
        JSON is not sanitized) unless the level is ``off``, keep a request on tiers 0-1.

        Raises:
            RequestError: a bad ``X-Potluck-Privacy`` value.
            PrivacyError: detection failed (fail closed).
        """
        level = parse_level(request.header(PRIVACY_HEADER), self.default_level)
        if decide(level, tier) is Action.SEND_RAW:
            return None
        if request.tools is not None or any(m.tool_calls for m in request.messages or ()):
            return "tools and tool calls are not sanitized, so they stay on tiers 0-1"
        if level != "strict":
            return None
        sanitizer = await self.sanitizer()
        try:
            result = await asyncio.to_thread(sanitizer.sanitize, _texts(request))
        except PrivacyError:
            raise
        except Exception as exc:
            log.error("sanitization failed: %s", type(exc).__name__)
            raise PrivacyError(f"sanitization failed ({type(exc).__name__}); nothing was sent") from exc
        n_found = sum(result.entity_counts().values())
        if n_found:
            return f"privacy level 'strict': {n_found} sensitive value(s) may not leave your own devices"
        return None

    async def prepare(
        self, request: GenerationRequest, level: PrivacyLevel, tier: int, destination: str
    ) -> tuple[GenerationRequest, Sanitized]:
        """Sanitize ``request`` for ``destination`` and write its audit record.

        Raises:
            PolicyRefused: level ``strict`` and sensitive content detected.
            PrivacyError: sanitization or auditing failed (nothing may be sent).
        """
        messages = request.messages or ()
        if request.tools is not None or any(m.tool_calls for m in messages):
            # Tool definitions and call arguments are JSON the sanitizer does not rewrite: fail closed.
            raise PolicyRefused(
                f"tools and tool calls are not sanitized, so they are not sent to {destination} (tier {tier}); "
                "use a trusted route or X-Potluck-Privacy: off"
            )
        sanitizer = await self.sanitizer()
        texts = _texts(request)
        try:
            result = await asyncio.to_thread(sanitizer.sanitize, texts)
        except PrivacyError:
            raise
        except Exception as exc:
            log.error("sanitization failed: %s", type(exc).__name__)
            raise PrivacyError(f"sanitization failed ({type(exc).__name__}); nothing was sent") from exc
        n_found = sum(result.entity_counts().values())
        enforce_strict(level, tier, n_found)
        out = result.texts
        n = len(messages)
        outbound = replace(
            request,
            messages=tuple(replace(m, content=t) for m, t in zip(messages, out[:n], strict=True))
            if request.messages is not None
            else None,
            prompt=out[n] if request.prompt is not None else None,
            params=replace(request.params, stop=tuple(out[n + 1 : -1])),
            continuation=out[-1],
        )
        self._audit(
            destination, tier, level, Action.SANITIZE, result.entity_counts(), result.digest(), sum(len(t) for t in out)
        )
        return outbound, result

    def _audit(
        self, destination: str, tier: int, level: str, action: Action, counts: dict[str, int], digest: str, chars: int
    ) -> None:
        if self.audit is None:
            return
        record = AuditRecord(destination, tier, level, action.value, counts, digest, chars)
        try:
            self.audit.append(record)
        except OSError as exc:
            raise PrivacyError(f"cannot write the privacy audit record ({exc.strerror}); nothing was sent") from exc

    def audit_raw(self, request: GenerationRequest, destination: str, tier: int, level: str) -> None:
        """Audit a request sent unsanitized (level ``off``) to tier >= 2."""
        import hashlib

        texts = [m.content for m in request.messages or ()] + [request.prompt or ""]
        digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
        self._audit(destination, tier, level, Action.SEND_RAW, {}, digest, sum(len(t) for t in texts))


class GuardedRoute:
    """A route of tier >= 2 behind the privacy policy (created by :meth:`PrivacyGuard.wrap`)."""

    def __init__(self, inner: Route, guard: PrivacyGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.tier: Tier = inner.tier

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        """Sanitize, send, restore (see module docstring).

        Raises:
            RequestError: bad ``X-Potluck-Privacy`` value.
            ScopeRefused: a cloud route without the ``cloud`` scope, or ``off`` without
                ``privacy-override`` (:mod:`potluck.routing.scopes`); nothing was sent.
            PolicyRefused / PrivacyError: nothing was sent.
            Whatever the inner route raises.
        """
        level = parse_level(request.header(PRIVACY_HEADER), self.guard.default_level)
        destination = self.inner.model_id
        require_route_scopes(self.tier, request.scopes, raw=level == "off", destination=destination)
        if decide(level, self.tier) is Action.SEND_RAW:
            if self.tier >= Tier.COMMUNITY:
                self.guard.audit_raw(request, destination, self.tier, level)
            async with aclosing(self.inner.stream(request)) as events:
                async for event in events:
                    yield event
            return
        outbound, result = await self.guard.prepare(request, level, self.tier, destination)
        restorer = result.restorer().stream()
        held_tokens = 0
        held_lps: list[TokenLogprob] = []  # tokens of the sanitized text, as the model saw them
        async with aclosing(self.inner.stream(outbound)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    text = restorer.feed(event.text)
                    held_tokens += event.n_tokens
                    held_lps.extend(event.logprobs)
                    if text:
                        yield TextDelta(text, held_tokens, tuple(held_lps))
                        held_tokens, held_lps = 0, []
                elif isinstance(event, Finished):
                    tail = restorer.flush()
                    if tail or held_lps:
                        yield TextDelta(tail, held_tokens, tuple(held_lps))
                    yield event
                    return


def _texts(request: GenerationRequest) -> list[str]:
    """What the sanitizer sees, in order: messages, prompt, stop strings, continuation."""
    messages = [m.content for m in request.messages or ()]
    return [*messages, request.prompt or "", *request.params.stop, request.continuation]


__all__ = ["GuardedRoute", "PolicyRefused", "PrivacyGuard"]
