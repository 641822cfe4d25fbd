"""The router: which :class:`~potluck.routing.route.Route` serves a request for a model name.

Local models come first. Other sources of routes (peers in the swarm, the cloud) plug in as
:class:`RouteProvider`s; they are asked in the order they were added. When none of them knows a
model, :meth:`Router.resolve_async` asks each :class:`RouteDiscoverer` (the swarm's DHT lookup)
to go and find it, then asks the providers again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from potluck.errors import ModelLoading, ModelNotFound, PolicyRefused, RequestError, ScopeRefused
from potluck.routing.candidates import Candidate
from potluck.routing.constraints import PIN_HEADER
from potluck.routing.plan import PlannedRoute, RoutePlan
from potluck.routing.planner import Planner
from potluck.routing.request import GenerationRequest
from potluck.routing.route import Route, ServedModelRoute
from potluck.routing.scopes import CLOUD


@dataclass(frozen=True)
class ModelListing:
    """One entry of ``GET /v1/models``."""

    id: str
    owned_by: str  # "local", a peer ID, "cloud", or "alias of <model>"


class RouteProvider(Protocol):
    """A source of routes beyond this node's own models."""

    def listings(self) -> list[ModelListing]:
        """Models this provider can reach now."""
        ...

    def route_for(self, model: str) -> Route | None:
        """A route for ``model``, or ``None`` if this provider cannot serve it."""
        ...

    def candidates(self, model: str) -> list[Candidate]:
        """Every route this provider has for ``model`` (one per peer, per cloud model), including
        ones it excludes, with the reason (:class:`~potluck.routing.candidates.Candidate`)."""
        ...


class RouteDiscoverer(Protocol):
    """Something that can learn of routes it does not know yet (e.g. by a DHT lookup)."""

    async def discover(self, model: str) -> bool:
        """Look for ``model``; True when a provider may now have a route for it.

        Bounded in time by the implementation; never raises for "not found".
        """
        ...


class RouteRefresher(Protocol):
    """Something that can bring the router's view up to date (e.g. a state sync with the swarm)."""

    async def refresh(self, model: str) -> None:
        """Refresh what is known about ``model``'s routes; bounded in time, never raises."""
        ...


class Router:
    """Resolves model names to routes.

    Args:
        aliases: other names for models (``{"gpt-4o-mini": "SmolLM2-135M-Instruct"}``), applied
            before resolution; an alias never shadows a model that is served under that name.
    """

    def __init__(self, aliases: Mapping[str, str] | None = None) -> None:
        self.aliases = dict(aliases or {})
        self.planner = Planner()  # constraints and scores (node wires its policy and reputation)
        self.peer_id = ""  # this node's peer ID (the target of its local candidates); set by the node
        self._local: dict[str, ServedModelRoute] = {}
        self._loading: set[str] = set()
        self._providers: list[RouteProvider] = []
        self._discoverers: list[RouteDiscoverer] = []
        self._refreshers: list[RouteRefresher] = []

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

    def add_refresher(self, refresher: RouteRefresher) -> None:
        """Ask ``refresher`` to update the view before a failing request gives up (see :meth:`route`)."""
        self._refreshers.append(refresher)

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
        for alias, target in self.aliases.items():
            seen.setdefault(alias, ModelListing(alias, f"alias of {target}"))
        return list(seen.values())

    def canonical(self, model: str) -> str:
        """The model an alias names (unless a model is served under that very name); any other name unchanged."""
        return model if model in self._local else self.aliases.get(model, model)

    async def resolve_async(self, model: str | None) -> Route:
        """:meth:`resolve`, and when nothing knows ``model``, discover it first (the HTTP API's path).

        Each discoverer bounds its own lookup; the providers are asked again after every one that
        found something.

        Raises:
            ModelLoading: the model is loading on this node.
            ModelNotFound: nothing serves it, even after discovery.
        """
        model = self.canonical(model) if model else model
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
        model = self.canonical(model)
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

    # ------------------------------------------------------------------ the scored choice
    def candidates(self, model: str) -> list[Candidate]:
        """Every candidate for ``model``: the local route (or TP group), then each provider's."""
        found: list[Candidate] = []
        local = self._local.get(model)
        if local is not None:
            queue = local.queue_depth + local.active
            found.append(Candidate(local.kind, local.kind, self.peer_id, local, local.decode_tps or None, queue))
        for provider in self._providers:
            found.extend(provider.candidates(model))
        return found

    async def plan(self, request: GenerationRequest) -> RoutePlan:
        """The ranked candidates of ``request`` (``potluck route explain``, and :meth:`route`).

        An empty ``request.model`` means this node's default model; a model nothing knows is
        looked up by the discoverers first.

        Raises:
            ModelLoading: the model is loading on this node.
            ModelNotFound: nothing serves it, even after discovery.
            RequestError / PrivacyError: from the privacy policy.
        """
        model = self.canonical(request.model) if request.model else ""
        if not model:
            model = self.resolve(None).model_id
        if model in self._loading and model not in self._local:
            raise ModelLoading(f"model {model!r} is still loading; retry in a few seconds")
        found = self.candidates(model)
        for discoverer in self._discoverers if not found else ():
            if await discoverer.discover(model):
                found = self.candidates(model)
                if found:
                    break
        if not found:
            known = ", ".join(m.id for m in self.listings()) or "none"
            raise ModelNotFound(f"model {model!r} is not served here or in the swarm (available: {known})")
        return await self.planner.plan(request, model, found)

    async def route(self, request: GenerationRequest) -> PlannedRoute:
        """The route for ``request``: its plan's allowed candidates, best first, with failover.

        Raises:
            ModelLoading / ModelNotFound: as :meth:`plan`.
            PolicyRefused: the privacy policy keeps it off every candidate (HTTP 403).
            ScopeRefused: only cloud candidates, and the API key lacks ``cloud`` (HTTP 403).
            RequestError: ``X-Potluck-Route-Pin`` names no candidate.
        """
        plan = await self.plan(request)
        if not plan.allowed and not plan.last_resort:
            raise _no_route(plan)

        async def replan() -> RoutePlan:  # every candidate failed: refresh the view, plan again
            for refresher in self._refreshers:
                await refresher.refresh(plan.model)
            return await self.plan(request)

        return PlannedRoute(plan, self.planner.policy, self.planner.stats, replan)


def _no_route(plan: RoutePlan) -> Exception:
    """The error for a plan whose every candidate is ruled out (the most specific constraint)."""
    reasons = "; ".join(f"{r.candidate.key}: {r.refused}" for r in plan.ranked)
    kinds = {r.refusal.kind for r in plan.ranked if r.refusal is not None}
    if "privacy" in kinds:
        return PolicyRefused(
            f"no route for {plan.model!r} is allowed by the privacy policy ({reasons}); nothing was sent"
        )
    if kinds == {"scope"} or kinds == {"scope", "pin"}:
        return ScopeRefused(f"no route for {plan.model!r} without the '{CLOUD}' scope ({reasons})", scope=CLOUD)
    if kinds == {"pin"}:
        return RequestError(f"X-Potluck-Route-Pin names no candidate of {plan.model!r} ({reasons})", param=PIN_HEADER)
    return ModelNotFound(f"no usable route for {plan.model!r} now ({reasons})")
