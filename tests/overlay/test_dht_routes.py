"""A model the cluster state does not know is found through the DHT's provider records.

Three real libp2p hosts on loopback. ``a`` serves a model and ``b`` wants it; both are in swarm
``s``, but they know each other only through ``r``, a DHT node of another swarm (a public
rendezvous): ``r`` admits neither, so no signed record flows between ``a`` and ``b`` until ``b``
looks the model up in the DHT, dials and admits ``a`` and syncs with it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from potluck.errors import ModelNotFound
from potluck.identity import Tier, load_or_create_identity
from potluck.overlay import discovery
from potluck.overlay.discovery import _add_to_routing_table
from potluck.overlay.peer_routes import PeerRoute, PeerRouteProvider
from potluck.overlay.service import OverlayService
from potluck.overlay.serving import LocalServing
from potluck.routing.request import GenerationRequest, SamplingParams
from potluck.routing.route import Finished, ModelInfo, RouteEvent, TextDelta
from potluck.routing.router import Router
from tests.helpers import until_async

pytestmark = pytest.mark.timeout(120)
MODEL = "dht-only-model"


class _Echo:
    """A local route that answers "hi" (a served model without llama.cpp)."""

    model_id = MODEL
    info = ModelInfo(MODEL, "llama", 1, 1, "F32", 8, 8, "", 0)
    queue_depth = 0
    active = 0
    decode_tps = 0.0
    tier = Tier.LOCAL
    kind = "local"

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[RouteEvent, None]:
        yield TextDelta("hi", 1)
        yield Finished("stop", 1, 1)


def service(settings, router: Router | None = None) -> OverlayService:
    return OverlayService(settings, load_or_create_identity(settings.data_dir), LocalServing(router or Router()))


async def join_dht(svc: OverlayService, rendezvous: OverlayService) -> None:
    """Connect at the libp2p level only (``rendezvous`` refuses admission) and share DHT tables."""
    assert svc.p2p is not None and rendezvous.p2p is not None
    await svc.bridge.call(svc.p2p.connect, rendezvous.addrs[0])
    await svc.bridge.call(_add_to_routing_table, svc.dht, rendezvous.peer_id)
    await rendezvous.bridge.call(_add_to_routing_table, rendezvous.dht, svc.peer_id)


async def test_unknown_model_is_found_through_dht_provider_records(overlay_settings, monkeypatch):
    monkeypatch.setattr(discovery, "BOOTSTRAP_CHECK_S", 0.1)  # announce soon after connecting
    served = Router()
    served.add_local(_Echo())
    async with service(overlay_settings(swarm="rendezvous")) as r:
        async with service(overlay_settings(swarm="s"), served) as a, service(overlay_settings(swarm="s")) as b:
            await join_dht(a, r)
            await join_dht(b, r)
            router = Router()
            peers = PeerRouteProvider(b)
            router.add_provider(peers)
            router.add_discoverer(peers)
            # Nothing but the DHT links them: b's cluster state does not know the model.
            assert a.peer_id not in b.state and peers.route_for(MODEL) is None
            with pytest.raises(ModelNotFound):
                router.resolve(MODEL)

            async def discovered() -> bool:
                return await peers.discover(MODEL)

            # a announces its model shortly after it connected; poll until the record is there.
            await until_async(discovered, 60, "b to find the model through the DHT")
            assert a.peer_id in b.state and b.admission.is_admitted(a.peer_id)
            route = await router.resolve_async(MODEL)
            assert isinstance(route, PeerRoute)
            request = GenerationRequest(model=MODEL, params=SamplingParams(4, 0.0, 1.0, 0, 0, ()), prompt="x")
            events = [e async for e in route.stream(request)]
            assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "hi"
            assert isinstance(events[-1], Finished)


async def test_resolve_async_without_dht_answers_not_found(overlay_settings):
    async with service(overlay_settings(dht_enabled=False)) as b:
        router = Router()
        peers = PeerRouteProvider(b)
        router.add_provider(peers)
        router.add_discoverer(peers)
        with pytest.raises(ModelNotFound):
            await asyncio.wait_for(router.resolve_async("nobody-serves-this"), 15)
