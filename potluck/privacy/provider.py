"""Cloud models as router routes: ``cloud/<name>`` in ``/v1/models``, always behind the privacy guard.

:class:`CloudProvider` is a :class:`~potluck.routing.router.RouteProvider` and an async context
manager (it owns the :class:`~potluck.privacy.cloud.CloudClient` session). On entry it learns the
model names: the configured ``cloud_model``, or else the upstream's ``GET /models`` (bounded by
the client's deadlines; an unreachable upstream is logged and lists nothing).

Its candidates (:meth:`CloudProvider.candidates`) carry the per-token prices of the
``cloud_prices`` setting. A request for ``cloud/<name>`` has that one candidate; with
``cloud_fallback`` on, every cloud model is also a candidate for requests naming any other model
(scored like the rest, and the failover target when the swarm's candidates die). The router puts
every cloud route behind the privacy guard (tier 3).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType

from potluck.config import Settings
from potluck.errors import NetworkError, ProtocolViolation, RequestError
from potluck.identity import Tier
from potluck.privacy.cloud import CloudClient, CloudConfig
from potluck.routing.candidates import Candidate, Price
from potluck.routing.request import ChatMessage, GenerationRequest
from potluck.routing.route import Route, RouteEvent
from potluck.routing.router import ModelListing

log = logging.getLogger(__name__)

PREFIX = "cloud/"


class CloudRoute:
    """One upstream model (tier 3). Use it only through :meth:`PrivacyGuard.wrap` (the router does).

    A resumed request (``continuation`` set) is sent with the text already produced as a trailing
    ``assistant`` message (chat) or appended to the prompt (text completion): OpenAI's API has no
    continuation field, so a chat upstream continues after that message.
    """

    tier = Tier.CLOUD

    def __init__(self, client: CloudClient, upstream_model: str) -> None:
        self.client = client
        self.upstream_model = upstream_model
        self.model_id = PREFIX + upstream_model

    def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        if request.continuation:
            if request.messages is not None:
                messages = (*request.messages, ChatMessage("assistant", request.continuation))
                request = replace(request, messages=messages, continuation="")
            else:
                request = replace(request, prompt=(request.prompt or "") + request.continuation, continuation="")
        return self.client.stream(request, self.upstream_model)


def cloud_config(settings: Settings) -> CloudConfig:
    """The upstream settings (``cloud_*``) as a :class:`CloudConfig`; requires ``cloud_url``."""
    assert settings.cloud_url, "cloud_url is not set"
    key = settings.cloud_api_key.get_secret_value() if settings.cloud_api_key is not None else None
    return CloudConfig(
        base_url=settings.cloud_url,
        api_key=key or None,
        connect_timeout_s=settings.cloud_connect_timeout_s,
        read_timeout_s=settings.cloud_read_timeout_s,
        total_timeout_s=settings.cloud_total_timeout_s,
        max_retries=settings.cloud_retries,
    )


class CloudProvider:
    """Routes for ``cloud/<name>`` models.

    Args:
        config: the upstream.
        models: upstream model names to offer; empty: ask the upstream on entry.
        prices: per-token prices by ``cloud/<name>`` (``cloud_prices``); a model without one is free.
        fallback: cloud models are candidates for requests naming any model (``cloud_fallback``).
    """

    def __init__(
        self,
        config: CloudConfig,
        models: Sequence[str] = (),
        prices: Mapping[str, Price] | None = None,
        fallback: bool = False,
    ) -> None:
        self.client = CloudClient(config)
        self.models = list(models)
        self.prices = dict(prices or {})
        self.fallback = fallback

    async def __aenter__(self) -> CloudProvider:
        await self.client.__aenter__()
        if not self.models:
            try:
                self.models = await self.client.list_models()
            except (NetworkError, ProtocolViolation, RequestError) as exc:
                log.warning("cloud upstream %s lists no models: %s", self.client.config.base_url, exc)
        log.info("cloud models: %s", ", ".join(PREFIX + m for m in self.models) or "none")
        for unknown in sorted(set(self.prices) - {PREFIX + m for m in self.models}):
            log.warning("cloud_prices names %s, which the upstream does not offer", unknown)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.client.__aexit__(et, exc, tb)

    def listings(self) -> list[ModelListing]:
        return [ModelListing(PREFIX + m, "cloud") for m in self.models]

    def route_for(self, model: str) -> Route | None:
        """The (unguarded) route of ``cloud/<name>``, or ``None``."""
        if not model.startswith(PREFIX) or model[len(PREFIX) :] not in self.models:
            return None
        return CloudRoute(self.client, model[len(PREFIX) :])

    def candidates(self, model: str) -> list[Candidate]:
        """``cloud/<name>`` itself, or with ``fallback`` every cloud model for any other model."""
        if model.startswith(PREFIX):
            names = [model[len(PREFIX) :]] if model[len(PREFIX) :] in self.models else []
        else:
            names = list(self.models) if self.fallback else []
        return [
            Candidate(
                key=f"cloud:{name}",
                kind="cloud",
                target=PREFIX + name,
                route=CloudRoute(self.client, name),
                decode_tps=None,
                rtt_s=None,
                price=self.prices.get(PREFIX + name),
            )
            for name in names
        ]
