"""The guard around a tier >= 2 route, with an in-memory route standing in for the destination."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from potluck.errors import PolicyRefused, PrivacyError, RequestError, ScopeRefused
from potluck.identity import Tier
from potluck.privacy.audit import AuditLog
from potluck.privacy.guard import GuardedRoute, PrivacyGuard
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams
from potluck.routing.route import Finished, RouteEvent, TextDelta
from potluck.routing.scopes import ALL_SCOPES, CLOUD, PRIVACY_OVERRIDE

PROMPT = "I am Henrike Vollmar, mail henrike.vollmar@example.com, card 5500 0000 0000 0004."


class EchoRoute:
    """Records what it receives and replies with the placeholders it saw, in 3-character chunks."""

    def __init__(self, tier: int | None) -> None:
        if tier is not None:
            self.tier = tier
        self.model_id = "dest/model"
        self.received: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncIterator[RouteEvent]:
        self.received.append(request)
        text = "Hello " + " ".join(m.content for m in request.messages or ())
        for i in range(0, len(text), 3):
            yield TextDelta(text[i : i + 3], 1)
        yield Finished("stop", 5, len(text) // 3)


def _request(level: str | None = None, scopes: frozenset[str] = ALL_SCOPES) -> GenerationRequest:
    headers = (("x-potluck-privacy", level),) if level else ()
    return GenerationRequest(
        "dest/model",
        SamplingParams(max_tokens=8, stop=("Henrike Vollmar",)),
        messages=(ChatMessage("system", "Be kind to Henrike Vollmar."), ChatMessage("user", PROMPT)),
        headers=headers,
        scopes=scopes,
    )


async def _run(route, request) -> tuple[str, list[RouteEvent]]:
    events = [e async for e in route.stream(request)]
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events


@pytest.fixture
def guard(sanitizer, tmp_path) -> PrivacyGuard:
    return PrivacyGuard(AuditLog(tmp_path / "audit.jsonl"), "standard", lambda: sanitizer)


async def test_sanitized_out_restored_back(guard):
    inner = EchoRoute(tier=2)
    route = guard.wrap(inner)
    assert isinstance(route, GuardedRoute) and route.model_id == "dest/model"
    text, events = await _run(route, _request())
    sent = inner.received[0]
    flat = " ".join(m.content for m in sent.messages) + " ".join(sent.params.stop)
    for value in ("Henrike Vollmar", "henrike.vollmar@example.com", "5500 0000 0000 0004"):
        assert value not in flat
        assert value in text
    assert sent.params.stop == ("<PERSON_1>",)
    assert isinstance(events[-1], Finished) and "<PERSON" not in text
    (record,) = list(guard.audit.records())
    assert record.tier == 2 and record.entities["PERSON"] == 3 and record.action == "sanitize"


async def test_trusted_tiers_are_not_wrapped(guard):
    inner = EchoRoute(tier=1)
    assert guard.wrap(inner) is inner


async def test_guarded_route_keeps_the_inner_tier(guard):
    assert guard.wrap(EchoRoute(tier=Tier.COMMUNITY)).tier == Tier.COMMUNITY
    assert guard.wrap(EchoRoute(tier=Tier.CLOUD)).tier == Tier.CLOUD
    own = EchoRoute(tier=Tier.OWN)
    assert guard.wrap(own) is own


async def test_a_resumed_requests_continuation_is_sanitized(guard):
    """The router resumes a broken stream elsewhere with the text already produced (restored, so
    holding real values): that continuation leaves sanitized too."""
    inner = EchoRoute(tier=3)
    request = replace(_request(), continuation="As you said, Henrike Vollmar, ")
    await _run(guard.wrap(inner), request)
    sent = inner.received[0]
    assert "Henrike Vollmar" not in sent.continuation and "<PERSON_1>" in sent.continuation


async def test_refusal_is_the_routers_hard_constraint(guard):
    assert await guard.refusal(_request("strict"), Tier.COMMUNITY) is not None
    assert await guard.refusal(_request("strict"), Tier.OWN) is None
    assert await guard.refusal(_request("standard"), Tier.CLOUD) is None
    clean = replace(_request("strict"), messages=(ChatMessage("user", "hello there"),), params=SamplingParams())
    assert await guard.refusal(clean, Tier.CLOUD) is None


async def test_strict_refuses_and_sends_nothing(guard):
    inner = EchoRoute(tier=3)
    with pytest.raises(PolicyRefused):
        await _run(guard.wrap(inner), _request("strict"))
    assert inner.received == []
    clean = GenerationRequest(
        "dest/model",
        SamplingParams(),
        messages=(ChatMessage("user", "hello there"),),
        headers=(("x-potluck-privacy", "strict"),),
        scopes=ALL_SCOPES,
    )
    text, _ = await _run(guard.wrap(inner), clean)
    assert text == "Hello hello there"


async def test_off_sends_raw_and_audits(guard):
    inner = EchoRoute(tier=3)
    await _run(guard.wrap(inner), _request("off"))
    assert inner.received[0].messages[1].content == PROMPT
    (record,) = list(guard.audit.records())
    assert record.action == "raw" and record.entities == {}


async def test_bad_header_is_request_error(guard):
    inner = EchoRoute(tier=2)
    with pytest.raises(RequestError):
        await _run(guard.wrap(inner), _request("maybe"))
    assert inner.received == []


async def test_sanitizer_failure_sends_nothing(tmp_path):
    def broken():
        raise RuntimeError("cannot load word lists")

    inner = EchoRoute(tier=3)
    guard = PrivacyGuard(AuditLog(tmp_path / "a.jsonl"), "standard", broken)
    with pytest.raises(PrivacyError, match="nothing was sent"):
        await _run(guard.wrap(inner), _request())
    assert inner.received == []


async def test_audit_failure_sends_nothing(sanitizer, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "audit.jsonl").mkdir()  # a directory where the file should be: cannot append
    inner = EchoRoute(tier=2)
    guard = PrivacyGuard(AuditLog(tmp_path / "ro" / "audit.jsonl"), "standard", lambda: sanitizer)
    with pytest.raises(PrivacyError, match="audit"):
        await _run(guard.wrap(inner), _request())
    assert inner.received == []


async def test_cloud_route_needs_the_cloud_scope(guard):
    inner = EchoRoute(tier=3)
    with pytest.raises(ScopeRefused, match="'cloud' scope") as info:
        await _run(guard.wrap(inner), _request(scopes=frozenset()))
    assert info.value.scope == CLOUD and inner.received == []
    text, _ = await _run(guard.wrap(inner), _request(scopes=frozenset({CLOUD})))
    assert "Henrike Vollmar" in text and len(inner.received) == 1


async def test_community_route_needs_no_scope(guard):
    inner = EchoRoute(tier=2)
    await _run(guard.wrap(inner), _request(scopes=frozenset()))
    assert len(inner.received) == 1


@pytest.mark.parametrize("tier", [2, 3])
async def test_privacy_off_needs_the_override_scope(guard, tier):
    inner = EchoRoute(tier=tier)
    with pytest.raises(ScopeRefused, match="privacy-override") as info:
        await _run(guard.wrap(inner), _request("off", scopes=frozenset({CLOUD})))
    assert info.value.scope == PRIVACY_OVERRIDE and inner.received == []
    assert list(guard.audit.records()) == []  # refused before anything was audited or sent
    await _run(guard.wrap(inner), _request("off", scopes=frozenset({CLOUD, PRIVACY_OVERRIDE})))
    assert inner.received[0].messages[1].content == PROMPT
