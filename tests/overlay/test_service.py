"""Real libp2p hosts (each in its own trio thread) joined through bootstrap: admission, state
sync, gossip, RTT, expiry and refusal of peers without the swarm secret."""

from __future__ import annotations

import asyncio
import threading

import pytest

from potluck.errors import PeerRefused
from potluck.identity import load_or_create_identity
from potluck.overlay import rpc
from potluck.overlay.service import OverlayService
from potluck.overlay.serving import LocalServing
from potluck.overlay.wire import StateSyncRequest
from potluck.routing.router import Router
from tests.helpers import until_async

pytestmark = pytest.mark.timeout(120)


def service(settings) -> OverlayService:
    return OverlayService(settings, load_or_create_identity(settings.data_dir), LocalServing(Router()))


def overlay_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("potluck-overlay")]


async def test_bootstrap_join_sync_gossip_rtt_and_clean_shutdown(overlay_settings):
    async with service(overlay_settings(swarm_secret="correct horse")) as a:
        b_settings = overlay_settings(swarm_secret="correct horse", bootstrap=[a.addrs[0]])
        async with service(b_settings) as b:
            await until_async(lambda: b.peer_id in a.state and a.peer_id in b.state, what="mutual state")
            assert a.admission.is_admitted(b.peer_id) and b.admission.is_admitted(a.peer_id)
            # Deltas keep arriving: b's sequence number as seen by a grows with b's heartbeats.
            seq = a.state.get(b.peer_id).record.seq
            await until_async(lambda: a.state.get(b.peer_id).record.seq > seq, what="a newer record of b")
            rtt = await b.measure_rtt(a.peer_id)
            assert rtt is not None and rtt > 0
            view = b.cluster_view()
            assert {p["peer_id"] for p in view["peers"]} == {a.peer_id, b.peer_id}
        # b left: its record expires from a's view (ttl from settings).
    assert overlay_threads() == []


async def test_expired_peer_leaves_the_view(overlay_settings):
    async with service(overlay_settings(state_ttl_s=2.0)) as a:
        async with service(overlay_settings(state_ttl_s=2.0, bootstrap=[a.addrs[0]])) as b:
            await until_async(lambda: b.peer_id in a.state, what="b in a's view")
        await until_async(lambda: b.peer_id not in a.state, 30, what="b's record to expire")


async def test_peer_without_the_secret_cannot_read_write_or_call(overlay_settings):
    async with service(overlay_settings(swarm_secret="the real secret")) as a:
        async with service(overlay_settings(swarm_secret="a wrong secret!")) as mallory:
            with pytest.raises(PeerRefused):
                await mallory.connect(a.addrs[0])
            # Connected at the libp2p level, yet refused by every potluck protocol handler.
            assert mallory.p2p is not None
            with pytest.raises(PeerRefused):
                await mallory.bridge.call(rpc.ping, mallory.p2p, a.peer_id)
            with pytest.raises(PeerRefused):
                await mallory.bridge.call(
                    rpc.state_sync, mallory.p2p, a.peer_id, StateSyncRequest(records=(mallory._own.raw,))
                )
            # Give gossip time to flow if it could: neither view learns of the other. Proving an
            # absence takes a window of time, so this sleep is the test, not an ordering guess.
            for _ in range(3):
                await mallory.publish_own_record()
                await asyncio.sleep(0.5)
            assert mallory.peer_id not in a.state and a.peer_id not in mallory.state
            refused = a.metrics.registry.get_sample_value
            assert (refused("potluck_overlay_admission_refused_total", {"reason": "bad_secret"}) or 0) >= 1
            assert (refused("potluck_overlay_admission_refused_total", {"reason": "not_admitted"}) or 0) >= 2


async def test_other_swarm_and_allowlist_are_refused(overlay_settings):
    async with service(overlay_settings(swarm="alpha")) as a:
        async with service(overlay_settings(swarm="beta")) as other:
            with pytest.raises(PeerRefused):
                await other.connect(a.addrs[0])
    friend = overlay_settings(swarm="gamma")
    friend_id = load_or_create_identity(friend.data_dir).peer_id
    async with service(overlay_settings(swarm="gamma", allowlist=[friend_id], allowlist_only=True)) as a:
        async with service(overlay_settings(swarm="gamma")) as stranger:
            with pytest.raises(PeerRefused):
                await stranger.connect(a.addrs[0])
        async with service(friend) as f:
            await f.connect(a.addrs[0])
            assert a.admission.trust_tier(f.peer_id) == 1
            await until_async(lambda: f.peer_id in a.state, what="the allowlisted friend in the view")
