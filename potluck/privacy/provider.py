"""Cloud models as router routes: ``cloud/<name>`` in ``/v1/models``, always behind the privacy guard.

:class:`CloudProvider` is a :class:`~potluck.routing.router.RouteProvider` and an async context
manager (it owns the :class:`~potluck.privacy.cloud.CloudClient` session). On entry it learns the
model names: the configured ``cloud_model``, or else the upstream's ``GET /models`` (bounded by
the client's deadlines; an unreachable upstream is logged and lists nothing).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from types import TracebackType

from potluck.config import Settings
from potluck.errors import NetworkError, ProtocolViolation, RequestError
from potluck.identity import Tier
from potluck.privacy.cloud import CloudClient, CloudConfig
from potluck.privacy.guard import PrivacyGuard
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Route, RouteEvent
from potluck.routing.router import ModelListing

log = logging.getLogger(__name__)

PREFIX = "cloud/"


class CloudRoute:
    """One upstream model (tier 3). Use it only through :meth:`PrivacyGuard.wrap`."""

    tier = int(Tier.CLOUD)

    def __init__(self, client: CloudClient, upstream_model: str) -> None:
        self.client = client
        self.upstream_model = upstream_model
        self.model_id = PREFIX + upstream_model

    def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
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
        guard: the privacy guard every cloud route goes through.
        models: upstream model names to offer; empty: ask the upstream on entry.
    """

    def __init__(self, config: CloudConfig, guard: PrivacyGuard, models: Sequence[str] = ()) -> None:
        self.client = CloudClient(config)
        self.guard = guard
        self.models = list(models)

    async def __aenter__(self) -> CloudProvider:
        await self.client.__aenter__()
        if not self.models:
            try:
                self.models = await self.client.list_models()
            except (NetworkError, ProtocolViolation, RequestError) as exc:
                log.warning("cloud upstream %s lists no models: %s", self.client.config.base_url, exc)
        log.info("cloud models: %s", ", ".join(PREFIX + m for m in self.models) or "none")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.client.__aexit__(et, exc, tb)

    def listings(self) -> list[ModelListing]:
        return [ModelListing(PREFIX + m, "cloud") for m in self.models]

    def route_for(self, model: str) -> Route | None:
        if not model.startswith(PREFIX) or model[len(PREFIX) :] not in self.models:
            return None
        return self.guard.wrap(CloudRoute(self.client, model[len(PREFIX) :]))
