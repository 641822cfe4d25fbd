"""Trust tiers in the overlay: what a node announces in its signed record, how peers are placed,
and how strictly a tier is read from the wire."""

from __future__ import annotations

import time

import msgpack
import pytest

from potluck.identity import Tier, load_or_create_identity
from potluck.overlay import state as state_mod
from potluck.overlay.admission import Admission, announced_tier
from potluck.overlay.service import OverlayService
from potluck.overlay.serving import LocalServing
from potluck.overlay.state import Hardware, Load, PeerRecord, RecordRejected, parse_record
from potluck.routing.router import Router
from tests.overlay.conftest import make_identity

pytestmark = pytest.mark.timeout(60)


def service(settings) -> OverlayService:
    return OverlayService(settings, load_or_create_identity(settings.data_dir), LocalServing(Router()))


@pytest.mark.parametrize(("overrides", "tier"), [({}, Tier.COMMUNITY), ({"allowlist_only": True}, Tier.OWN)])
async def test_own_record_announces_the_configured_tier(overlay_settings, overrides, tier):
    settings = overlay_settings(**overrides)
    assert announced_tier(settings) is tier
    async with service(settings) as a:
        own = a.state.get(a.peer_id)
        assert own is not None
        assert own.record.trust_tier is tier  # a Tier, not a bare int
        # What the wire carries decodes to the same tier.
        assert parse_record(own.raw, settings.swarm, time.time()).record.trust_tier is tier


def test_admission_places_peers_by_its_own_policy():
    me, friend, stranger = (make_identity().peer_id for _ in range(3))
    admission = Admission(me, "s", None, allowlist=[friend])
    assert admission.trust_tier(me) is Tier.LOCAL
    assert admission.trust_tier(friend) is Tier.OWN
    assert admission.trust_tier(stranger) is Tier.COMMUNITY


def _raw_with_tier(tier: object) -> bytes:
    ident = make_identity()
    body_fields = PeerRecord(
        peer_id=ident.peer_id,
        swarm="s",
        hardware=Hardware(ram_total=1, ram_free=1, cores=1, decode_tps=0.0),
        load=Load(queue_depth=0, active=0),
        version="0",
        seq=1,
        expires_at=time.time() + 60,
    ).model_dump(mode="python")
    body_fields["trust_tier"] = tier
    body = msgpack.packb(body_fields, use_bin_type=True)
    return msgpack.packb({"body": body, "sig": ident.sign(state_mod._SIG_CONTEXT + body)}, use_bin_type=True)


def test_wire_tier_is_an_exact_int_in_range():
    assert parse_record(_raw_with_tier(1), "s", time.time()).record.trust_tier is Tier.OWN
    for bad in (5, -1, 2.0, "2", True):
        with pytest.raises(RecordRejected) as exc:
            parse_record(_raw_with_tier(bad), "s", time.time())
        assert exc.value.reason == "malformed", bad
