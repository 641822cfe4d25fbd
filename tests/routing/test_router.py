"""The scored router: hard constraints first (privacy per tier, cloud scope, max cost), then a score
over predicted latency, cost and trust; failover walks the ranked list across tiers.

The privacy guard is the real one (presidio sanitizer); routes are in-memory
(:class:`tests.routing.conftest.WordsRoute`).
"""

from __future__ import annotations

import pytest

from potluck.errors import PolicyRefused, ScopeRefused
from potluck.identity import Tier
from potluck.privacy.guard import PrivacyGuard
from potluck.privacy.sanitizer import Sanitizer
from potluck.routing.candidates import Price
from potluck.routing.constraints import Limits
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams
from potluck.routing.route import Finished, TextDelta
from potluck.routing.router import Router
from potluck.routing.scopes import ALL_SCOPES, PRIVACY_OVERRIDE
from tests.routing.conftest import StaticSource, WordsRoute, candidate

WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " cat", "."]
SENSITIVE = "My name is Henrike Vollmar and my email is henrike.vollmar@example.org."


@pytest.fixture(scope="module")
def sanitizer() -> Sanitizer:
    return Sanitizer()


def _router(sanitizer: Sanitizer, *candidates, limits: Limits | None = None) -> Router:
    router = Router()
    router.peer_id = "me"
    router.planner.policy = PrivacyGuard(None, "standard", lambda: sanitizer)
    if limits is not None:
        router.planner.limits = limits
    router.add_provider(StaticSource(list(candidates)))
    return router


def _request(text: str = "Tell me a story.", level: str | None = None, scopes=ALL_SCOPES, max_tokens: int = 9):
    headers = (("x-potluck-privacy", level),) if level else ()
    return GenerationRequest(
        "m",
        SamplingParams(max_tokens=max_tokens),
        messages=(ChatMessage("user", text),),
        headers=headers,
        scopes=scopes,
    )


async def _complete(route, request) -> tuple[str, Finished]:
    parts, done = [], None
    async for event in route.stream(request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            done = event
    assert done is not None
    return "".join(parts), done


# ---------------------------------------------------------------- hard constraints
async def test_strict_keeps_a_sensitive_request_off_tier_2_and_up(sanitizer):
    own = WordsRoute(WORDS, Tier.OWN)
    community = WordsRoute(WORDS, Tier.COMMUNITY)
    cloud = WordsRoute(WORDS, Tier.CLOUD)
    router = _router(
        sanitizer,
        candidate("peer:fast-stranger", community, tps=200.0),  # the best score, but tier 2
        candidate("cloud:x", cloud, kind="cloud", tps=500.0),
        candidate("peer:my-laptop", own, tps=5.0),  # slow, but one of my own devices
    )
    plan = await router.plan(_request(SENSITIVE, level="strict"))
    allowed = [r.candidate.key for r in plan.allowed]
    assert allowed == ["peer:my-laptop"]
    refused = {r.candidate.key: r.refusal for r in plan.ranked if r.refusal is not None}
    assert {r.kind for r in refused.values()} == {"privacy"} and set(refused) == {"peer:fast-stranger", "cloud:x"}
    # The same request under "standard" may go to the stranger (sanitized), which scores best.
    plan = await router.plan(_request(SENSITIVE, level="standard"))
    assert plan.allowed[0].candidate.key == "peer:fast-stranger"

    route = await router.route(_request(SENSITIVE, level="strict"))
    text, _ = await _complete(route, _request(SENSITIVE, level="strict"))
    assert text == "".join(WORDS) and community.received == [] and cloud.received == []
    assert route.route_header().startswith("peer; target=my-laptop; key=peer:my-laptop;")


async def test_strict_with_only_strangers_is_refused_and_nothing_is_sent(sanitizer):
    community = WordsRoute(WORDS, Tier.COMMUNITY)
    router = _router(sanitizer, candidate("peer:stranger", community))
    with pytest.raises(PolicyRefused):
        await router.route(_request(SENSITIVE, level="strict"))
    assert community.received == []


async def test_cloud_needs_the_cloud_scope(sanitizer):
    cloud = WordsRoute(WORDS, Tier.CLOUD)
    peer = WordsRoute(WORDS, Tier.COMMUNITY)
    router = _router(sanitizer, candidate("cloud:x", cloud, kind="cloud", tps=1000.0), candidate("peer:p", peer))
    plan = await router.plan(_request(scopes=frozenset({PRIVACY_OVERRIDE})))
    assert [r.candidate.key for r in plan.allowed] == ["peer:p"]
    cloud_ranked = next(r for r in plan.ranked if r.candidate.key == "cloud:x")
    assert cloud_ranked.refusal is not None and cloud_ranked.refusal.kind == "scope"
    assert (await router.plan(_request(max_tokens=64))).allowed[0].candidate.key == "cloud:x"  # with the scope

    only_cloud = _router(sanitizer, candidate("cloud:x", cloud, kind="cloud"))
    with pytest.raises(ScopeRefused):
        await only_cloud.route(_request(scopes=frozenset()))
    assert cloud.received == []


async def test_max_cost_rules_out_a_pricey_cloud_model(sanitizer):
    pricey = candidate("cloud:big", WordsRoute(WORDS, Tier.CLOUD), kind="cloud", price=Price(5000.0, 15000.0))
    cheap = candidate("cloud:small", WordsRoute(WORDS, Tier.CLOUD), kind="cloud", price=Price(0.1, 0.4))
    router = _router(sanitizer, pricey, cheap, limits=Limits(max_cost=0.01))
    plan = await router.plan(_request())
    assert [r.candidate.key for r in plan.allowed] == ["cloud:small"]
    assert next(r for r in plan.ranked if r.candidate.key == "cloud:big").refusal.kind == "cost"


# ---------------------------------------------------------------- score
async def test_ranking_by_predicted_latency_with_loaded_and_idle_peers(sanitizer):
    idle = candidate("peer:idle", WordsRoute(WORDS), tps=20.0, queue=0)
    loaded = candidate("peer:loaded", WordsRoute(WORDS), tps=30.0, queue=3)  # faster, but three ahead
    slow = candidate("peer:slow", WordsRoute(WORDS), tps=4.0, queue=0)
    far = candidate("peer:far", WordsRoute(WORDS), tps=20.0, queue=0, rtt_s=0.8)
    router = _router(sanitizer, loaded, slow, far, idle)
    plan = await router.plan(_request(max_tokens=64))
    assert [r.candidate.key for r in plan.allowed] == ["peer:idle", "peer:far", "peer:loaded", "peer:slow"]
    by_key = {r.candidate.key: r.prediction for r in plan.ranked}
    # Each stream the loaded peer runs slows ours (LOAD_SHARE); latency adds the remaining tokens.
    assert by_key["peer:loaded"].latency_s > by_key["peer:idle"].latency_s
    assert by_key["peer:idle"].latency_s == pytest.approx(by_key["peer:idle"].ttft_s + 63 / 20.0)
    # Once the loaded peer's queue drains it wins on speed.
    drained = _router(sanitizer, idle, candidate("peer:loaded", WordsRoute(WORDS), tps=30.0, queue=0))
    assert (await drained.plan(_request(max_tokens=64))).allowed[0].candidate.key == "peer:loaded"


async def test_measured_speed_overrides_the_advertised_one(sanitizer):
    boaster = candidate("peer:boaster", WordsRoute(WORDS), tps=100.0)
    honest = candidate("peer:honest", WordsRoute(WORDS), tps=20.0)
    router = _router(sanitizer, boaster, honest)
    assert (await router.plan(_request(max_tokens=64))).allowed[0].candidate.key == "peer:boaster"
    router.planner.stats.observe("peer:boaster", 40, 10.0)  # 4 tokens/s as this node measured it
    plan = await router.plan(_request(max_tokens=64))
    assert plan.allowed[0].candidate.key == "peer:honest"
    assert next(r for r in plan.ranked if r.candidate.key == "peer:boaster").prediction.tps_source == "measured here"


async def test_reputation_hook_penalises_and_excludes(sanitizer):
    a = candidate("peer:a", WordsRoute(WORDS), tps=21.0)  # a little faster
    b = candidate("peer:b", WordsRoute(WORDS), tps=20.0)
    router = _router(sanitizer, a, b, limits=Limits(min_reputation=0.2))
    router.planner.reputation = lambda peer: 1.0
    assert (await router.plan(_request(max_tokens=16))).allowed[0].candidate.key == "peer:a"
    router.planner.reputation = lambda peer: {"a": 0.5, "b": 1.0}[peer]  # a is unverified
    assert (await router.plan(_request(max_tokens=16))).allowed[0].candidate.key == "peer:b"
    router.planner.reputation = lambda peer: {"a": 0.1, "b": 1.0}[peer]
    plan = await router.plan(_request(max_tokens=16))
    assert [r.candidate.key for r in plan.allowed] == ["peer:b"]
    assert next(r for r in plan.ranked if r.candidate.key == "peer:a").refusal.kind == "reputation"


# ---------------------------------------------------------------- failover
async def test_failover_from_a_dead_peer_to_the_next_then_the_cloud_sanitized(sanitizer):
    first = WordsRoute(WORDS, die_after=3)
    second = WordsRoute(WORDS, die_after=2)
    cloud = WordsRoute(WORDS, Tier.CLOUD)
    router = _router(
        sanitizer,
        candidate("peer:first", first, tps=50.0),
        candidate("peer:second", second, tps=40.0),
        candidate("cloud:x", cloud, kind="cloud", tps=10.0),
    )
    request = _request(SENSITIVE)
    route = await router.route(request)
    text, done = await _complete(route, request)
    assert text == "".join(WORDS)  # one completion, no repeats, no gaps
    assert done.completion_tokens == len(WORDS) and done.finish_reason == "length"
    assert [k for k, _ in route.failures] == ["peer:first", "peer:second"]
    sent = cloud.received[0]  # the cloud got the sanitized prompt and the produced text to continue
    assert sent.continuation == "".join(WORDS[:5]) and sent.params.max_tokens == len(WORDS) - 5
    assert "Henrike Vollmar" not in sent.messages[0].content and "<PERSON_1>" in sent.messages[0].content
    assert route.route_header().startswith("peer; target=first;")


async def test_a_plan_with_nothing_allowed_explains_itself(sanitizer):
    router = _router(sanitizer)
    router.add_provider(StaticSource([]))
    from potluck.errors import ModelNotFound

    with pytest.raises(ModelNotFound):
        await router.plan(_request())


async def test_a_stale_view_is_refreshed_before_the_client_sees_an_error(sanitizer):
    """The failover bug of issue 14: the only candidate in the view dies mid-stream while another
    peer is alive but not in the view yet (its record with the model had not arrived). The route
    refreshes the view (a state sync, here a refresher that reveals the peer), plans again and
    resumes there."""
    dying = WordsRoute(WORDS, die_after=4)
    survivor = WordsRoute(WORDS)
    source = StaticSource([candidate("peer:dying", dying)])

    class Refresher:
        calls = 0

        async def refresh(self, model: str) -> None:
            Refresher.calls += 1
            source._candidates.append(candidate("peer:survivor", survivor))

    router = _router(sanitizer)
    router.add_provider(source)
    router.add_refresher(Refresher())
    route = await router.route(_request())
    text, done = await _complete(route, _request())
    assert text == "".join(WORDS) and done.completion_tokens == len(WORDS)
    assert Refresher.calls == 1 and survivor.received[0].continuation == "".join(WORDS[:4])


async def test_every_candidate_dead_raises_the_last_error_after_the_refreshes(sanitizer):
    from potluck.errors import TransferError

    router = _router(sanitizer, candidate("peer:a", WordsRoute(WORDS, die_after=1)))
    refreshes = []

    class Refresher:
        async def refresh(self, model: str) -> None:
            refreshes.append(model)

    router.add_refresher(Refresher())
    route = await router.route(_request())
    with pytest.raises(TransferError):
        await _complete(route, _request())
    assert refreshes == ["m", "m"]  # MAX_REPLANS fresh plans, then the error


async def test_a_peer_in_backoff_is_the_last_resort_not_a_lost_answer(sanitizer):
    """A peer that failed before (say its previous process was killed) is in backoff; when the only
    allowed candidate dies, it still resumes the answer rather than the client getting an error."""
    from dataclasses import replace

    dying = WordsRoute(WORDS, die_after=3)
    restarted = WordsRoute(WORDS)
    backed_off = replace(candidate("peer:restarted", restarted, tps=80.0), backoff="in backoff after 2 failure(s)")
    router = _router(sanitizer, candidate("peer:dying", dying), backed_off)
    plan = await router.plan(_request())
    assert [r.candidate.key for r in plan.allowed] == ["peer:dying"]  # backoff keeps it out of the ranking
    assert [r.candidate.key for r in plan.last_resort] == ["peer:restarted"]
    route = await router.route(_request())
    text, done = await _complete(route, _request())
    assert text == "".join(WORDS) and done.completion_tokens == len(WORDS)
    assert restarted.received[0].continuation == "".join(WORDS[:3])
