"""Cloud offload end to end: client -> node A -> recording proxy -> node B (a real OpenAI-compatible server).

Node B (``potluck node start`` on a fixture GGUF) stands in for the cloud; the recording proxy
(:mod:`tests.e2e.recording_proxy`) logs exactly what the "cloud" receives and makes the streamed
reply echo the placeholders it saw, split across SSE events. Node A runs with ``--cloud-url``
pointing at the proxy and serves ``cloud/<model>``.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import openai
import pytest

from potluck.errors import PrivacyError
from potluck.privacy.cloud import CloudClient, CloudConfig
from potluck.privacy.guard import PrivacyGuard
from potluck.privacy.provider import CloudRoute
from potluck.routing.request import ChatMessage, GenerationRequest, SamplingParams
from potluck.routing.scopes import CLOUD
from tests.e2e.procs import POTLUCK, NodeProcess, offline_env, recording_proxy

pytestmark = pytest.mark.e2e

UPSTREAM_MODEL = "tinyshakespeare-q8_0"
SECRETS = {
    "Sara Schwarz": "PERSON",
    "sara.schwarz@example.org": "EMAIL_ADDRESS",
    "+44 20 7946 0958": "PHONE_NUMBER",
    "4111 1111 1111 1111": "CREDIT_CARD",
    "GB82WEST12345698765432": "IBAN_CODE",
    "ghp_Zq3kR8vT2mW9xY4bN7cD1fG5hJ6kL0pQ2sT8": "SECRET",
}
PROMPT = (
    "I am Sara Schwarz (sara.schwarz@example.org, +44 20 7946 0958). Please check card "
    "4111 1111 1111 1111 and IBAN GB82WEST12345698765432; my token is ghp_Zq3kR8vT2mW9xY4bN7cD1fG5hJ6kL0pQ2sT8"
)


def _env(home: Path) -> dict[str, str]:
    return offline_env(home, POTLUCK_P2P_ENABLED="false")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, model_path):
    """(node A, proxy base URL, record file) with node B behind the proxy."""
    root = tmp_path_factory.mktemp("cloud")
    record = root / "upstream-requests.jsonl"
    record.touch()
    with NodeProcess(root / "b", "--model", str(model_path("q8_0")), env=_env(root / "b")) as node_b:
        node_b.wait_ready()
        with recording_proxy(node_b.url, record, root / "proxy.log") as proxy_url:
            with NodeProcess(
                root / "a",
                "--model",
                str(model_path("q8_0")),
                "--cloud-url",
                proxy_url + "/v1",
                "--cloud-model",
                UPSTREAM_MODEL,
                env=_env(root / "a"),
            ) as node_a:
                node_a.wait_ready()
                yield node_a, proxy_url, record, root / "a"


def _upstream_bodies(record: Path) -> list[str]:
    return [json.loads(line)["body"] for line in record.read_text().splitlines() if line.strip()]


def _assert_clean(bodies: list[str]) -> None:
    assert bodies, "nothing reached the upstream"
    for body in bodies:
        for value in SECRETS:
            assert value not in body, f"{value!r} leaked upstream: {body}"


def test_cloud_model_listed(cloud):
    node_a, *_ = cloud
    client = openai.OpenAI(base_url=node_a.url + "/v1", api_key="unused")
    ids = [m.id for m in client.models.list().data]
    assert f"cloud/{UPSTREAM_MODEL}" in ids


@pytest.mark.parametrize("stream", [False, True])
def test_sanitized_upstream_restored_reply(cloud, stream):
    node_a, _, record, _ = cloud
    n_before = len(_upstream_bodies(record))
    client = openai.OpenAI(base_url=node_a.url + "/v1", api_key="unused")
    messages = [
        {"role": "system", "content": "You help Sara Schwarz with her bank."},
        {"role": "user", "content": PROMPT},
    ]
    kwargs = {"model": f"cloud/{UPSTREAM_MODEL}", "messages": messages, "max_tokens": 8, "temperature": 0}
    if stream:
        text = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True) if c.choices
        )
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content or ""
    bodies = _upstream_bodies(record)[n_before:]
    assert len(bodies) == 1
    _assert_clean(bodies)
    sent = json.loads(bodies[0])["messages"]
    # same value -> same placeholder in every message of the history
    assert "<PERSON_1>" in sent[0]["content"] and "<PERSON_1>" in sent[1]["content"]
    for etype in set(SECRETS.values()):
        assert f"<{etype}_1>" in sent[1]["content"]
    # the reply echoed every placeholder (split across SSE events, canonical and lower-case): restored
    assert text.startswith("ECHO ")
    for value in SECRETS:
        assert text.count(value) == 2, (value, text)
    assert "<PERSON" not in text and "<person" not in text


def test_strict_header_refuses_and_sends_nothing(cloud):
    node_a, _, record, _ = cloud
    n_before = len(_upstream_bodies(record))
    body = json.dumps(
        {"model": f"cloud/{UPSTREAM_MODEL}", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    ).encode()
    req = urllib.request.Request(
        node_a.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Potluck-Privacy": "strict"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=60)
    assert info.value.code == 403
    assert json.loads(info.value.read())["error"]["code"] == "policy_refused"
    assert len(_upstream_bodies(record)) == n_before


def test_audit_log_has_counts_not_values(cloud):
    _, _, _, home_a = cloud
    out = subprocess.run(
        [*POTLUCK, "privacy", "audit", "--json", "--data-dir", str(home_a / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(home_a),
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines()]
    sanitized = [r for r in records if r["action"] == "sanitize"]
    assert sanitized and all(r["tier"] == 3 and r["destination"] == f"cloud/{UPSTREAM_MODEL}" for r in sanitized)
    assert sanitized[-1]["entities"]["PERSON"] >= 1 and sanitized[-1]["entities"]["SECRET"] == 1
    raw = (home_a / "data" / "privacy-audit.jsonl").read_text()
    for value in SECRETS:
        assert value not in raw


async def test_sanitizer_failure_sends_nothing(cloud):
    """Same real upstream, the guard in this process with a detector that fails: nothing is sent."""
    _, proxy_url, record, _ = cloud
    n_before = len(_upstream_bodies(record))

    def broken_sanitizer():
        from potluck.privacy.analyzer import Detector
        from potluck.privacy.sanitizer import Sanitizer

        class Broken(Detector):
            def __init__(self) -> None:
                self.min_score = 0.0

                class Engine:
                    def analyze(self, **kwargs):
                        raise RuntimeError("recognizer crashed")

                self.engine = Engine()

        return Sanitizer(Broken())

    guard = PrivacyGuard(audit=None, sanitizer_factory=broken_sanitizer)
    request = GenerationRequest(
        model=f"cloud/{UPSTREAM_MODEL}",
        params=SamplingParams(max_tokens=4),
        messages=(ChatMessage("user", PROMPT),),
        scopes=frozenset({CLOUD}),
    )
    async with CloudClient(CloudConfig(proxy_url + "/v1", max_retries=0)) as client:
        route = guard.wrap(CloudRoute(client, UPSTREAM_MODEL))
        with pytest.raises(PrivacyError, match="nothing was sent"):
            async for _ in route.stream(request):
                pass
        # the same client works once sanitization works: the failure above was the guard's
        ok = PrivacyGuard(audit=None).wrap(CloudRoute(client, UPSTREAM_MODEL))
        events = [e async for e in ok.stream(request)]
        assert events
    bodies = _upstream_bodies(record)[n_before:]
    assert len(bodies) == 1  # only the second, sanitized request
    _assert_clean(bodies)
