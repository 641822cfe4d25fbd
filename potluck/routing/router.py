"""The router: which :class:`~potluck.routing.route.Route` serves a request for a model name.

Local models come first. Other sources of routes (peers in the swarm, the cloud) plug in as
:class:`RouteProvider`s; they are asked in the order they were added. When none of them knows a
model, :meth:`Router.resolve_async` asks each :class:`RouteDiscoverer` (the swarm's DHT lookup)
to go and find it, then asks the providers again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from potluck.errors import ModelLoading, ModelNotFound
from potluck.routing.route import Route, ServedModelRoute


@dataclass(frozen=True)
class ModelListing:
    """One entry of ``GET /v1/models``."""

    id: str
    owned_by: str  # "local", a peer ID, or "cloud"


class RouteProvider(Protocol):
    """A source of routes beyond this node's own models."""

    def listings(self) -> list[ModelListing]:
        """Models this provider can reach now."""
        ...

    def route_for(self, model: str) -> Route | None:
        """A route for ``model``, or ``None`` if this provider cannot serve it."""
        ...


class RouteDiscoverer(Protocol):
    """Something that can learn of routes it does not know yet (e.g. by a DHT lookup)."""

    async def discover(self, model: str) -> bool:
        """Look for ``model``; True when a provider may now have a route for it.

        Bounded in time by the implementation; never raises for "not found".
        """
        ...


class Router:
    """Resolves model names to routes."""

    def __init__(self) -> None:
        self._local: dict[str, ServedModelRoute] = {}
        self._loading: set[str] = set()
        self._providers: list[RouteProvider] = []
        self._discoverers: list[RouteDiscoverer] = []

    def mark_loading(self, model_id: str) -> None:
        """Announce a local model that is still loading (requests for it get HTTP 503)."""
        self._loading.add(model_id)

    def add_local(self, route: ServedModelRoute) -> None:
        """Serve ``route.model_id`` from this node."""
        self._loading.discard(route.model_id)
        self._local[route.model_id] = route

    def remove_local(self, model_id: str) -> ServedModelRoute | None:
        self._loading.discard(model_id)
        return self._local.pop(model_id, None)

    def add_provider(self, provider: RouteProvider) -> None:
        self._providers.append(provider)

    def add_discoverer(self, discoverer: RouteDiscoverer) -> None:
        """Ask ``discoverer`` for models nothing else serves (see :meth:`resolve_async`)."""
        self._discoverers.append(discoverer)

    @property
    def local_routes(self) -> list[ServedModelRoute]:
        return list(self._local.values())

    @property
    def loading(self) -> list[str]:
        """Local models announced with :meth:`mark_loading` that are not served yet."""
        return sorted(self._loading)

    def listings(self) -> list[ModelListing]:
        """Every model reachable from this node, local first, without duplicates."""
        seen: dict[str, ModelListing] = {m: ModelListing(m, "local") for m in self._local}
        for provider in self._providers:
            for listing in provider.listings():
                seen.setdefault(listing.id, listing)
        return list(seen.values())

    async def resolve_async(self, model: str | None) -> Route:
        """:meth:`resolve`, and when nothing knows ``model``, discover it first (the HTTP API's path).

        Each discoverer bounds its own lookup; the providers are asked again after every one that
        found something.

        Raises:
            ModelLoading: the model is loading on this node.
            ModelNotFound: nothing serves it, even after discovery.
        """
        try:
            return self.resolve(model)
        except ModelNotFound:
            if not model or not self._discoverers:
                raise
        for discoverer in self._discoverers:
            if await discoverer.discover(model):
                try:
                    return self.resolve(model)
                except ModelNotFound:
                    continue
        return self.resolve(model)

    def resolve(self, model: str | None) -> Route:
        """The route for ``model`` (``None`` or empty: this node's default model).

        Raises:
            ModelLoading: the model is loading on this node.
            ModelNotFound: nothing here or among the providers serves it.
        """
        if not model:
            if self._local:
                return next(iter(self._local.values()))
            if self._loading:
                raise ModelLoading("the model is still loading; retry in a few seconds")
            raise ModelNotFound("this node serves no model; name one with the 'model' field")
        if model in self._local:
            return self._local[model]
        if model in self._loading:
            raise ModelLoading(f"model {model!r} is still loading; retry in a few seconds")
        for provider in self._providers:
            route = provider.route_for(model)
            if route is not None:
                return route
        known = ", ".join(m.id for m in self.listings()) or "none"
        raise ModelNotFound(f"model {model!r} is not served here or in the swarm (available: {known})")
