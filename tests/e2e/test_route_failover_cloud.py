"""A killed peer fails over to the cloud, sanitized, and the client still gets one complete answer.

Real processes: peer P serves the fixture model in a swarm with the client's node C; the "cloud" is
a real node S behind the recording proxy (:mod:`tests.e2e.recording_proxy`, as in
``test_cloud_offload.py``), which C offers as ``cloud/<model>`` with ``cloud_fallback`` on and a
price, so the free peer ranks first. The request carries personal data (sanitized toward both
tier 2 and tier 3). P is SIGKILLed after the first tokens; C resumes on the cloud candidate.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from contextlib import ExitStack

import pytest

from tests.e2e.procs import NodeProcess, free_port, get_json, offline_env, recording_proxy, swarm_env
from tests.helpers import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MODEL = "tinyshakespeare-q8_0"
SECRETS = ("Sara Schwarz", "sara.schwarz@example.org", "+44 20 7946 0958")
PROMPT = "I am Sara Schwarz (sara.schwarz@example.org, +44 20 7946 0958). ROMEO:"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model_path):
    root = tmp_path_factory.mktemp("route-cloud")
    record = root / "upstream.jsonl"
    record.touch()
    procs: list = []
    stack = ExitStack()  # the proxy, closed after the nodes that use it
    try:
        stand_in = NodeProcess(
            root / "s", "--model", str(model_path("q8_0")), env=offline_env(root / "s", POTLUCK_P2P_ENABLED="false")
        )
        procs.append(stand_in)
        stand_in.wait_ready()
        proxy_url = stack.enter_context(recording_proxy(stand_in.url, record, root / "proxy.log"))
        swarm = f"route-cloud-{os.getpid()}"
        boot_port = free_port()
        env_c = swarm_env(
            root / "c",
            swarm,
            "route-cloud-secret",
            "0",
            POTLUCK_CLOUD_FALLBACK="true",
            POTLUCK_CLOUD_PRICES=json.dumps({f"cloud/{MODEL}": {"input": 1.0, "output": 2.0}}),
        )
        client = NodeProcess(
            root / "c",
            "--model",
            str(model_path("q4_0")),
            "--p2p-port",
            str(boot_port),
            "--cloud-url",
            proxy_url + "/v1",
            "--cloud-model",
            MODEL,
            env=env_c,
        )
        procs.append(client)
        client.wait_ready()
        boot = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{get_json(client.url + '/api/node')['peer_id']}"
        peer = NodeProcess(
            root / "p",
            "--model",
            str(model_path("q8_0")),
            "--bootstrap",
            boot,
            env=swarm_env(root / "p", swarm, "route-cloud-secret", "20"),
        )
        procs.append(peer)
        peer.wait_ready()
        peer_id = get_json(peer.url + "/api/node")["peer_id"]
        yield client, peer, peer_id, record
    finally:
        for p in reversed(procs):
            p.stop()
        stack.close()


def _explain(url: str) -> dict:
    return get_json(f"{url}/api/route/explain?model={MODEL}&max_tokens={MAX_TOKENS}")


def test_killed_peer_fails_over_to_the_cloud_sanitized_and_complete(setup):
    client, peer, peer_id, record = setup

    last: list[dict] = []

    def ranked() -> list[str] | None:
        last[:] = [_explain(client.url)]
        keys = [c["key"] for c in last[0]["candidates"] if c["allowed"]]
        return keys if keys[:1] == [f"peer:{peer_id}"] and f"cloud:{MODEL}" in keys else None

    try:
        keys = until(ranked, 60, "the peer ranked first and the cloud as its fallback", retry_on=(OSError,))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last plan: {json.dumps(last)}") from None
    assert keys == [f"peer:{peer_id}", f"cloud:{MODEL}"]

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        client.url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text, errors, finish, usage, partial = [], [], None, None, None
    with urllib.request.urlopen(req, timeout=120) as resp:
        route_header = resp.headers["X-Potluck-Route"]
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                break
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk)
                continue
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
            if partial is None and text:
                peer.proc.send_signal(signal.SIGKILL)  # the serving peer dies mid-stream
                peer.proc.wait(30)
                partial = "".join(text)
    assert errors == []
    assert route_header.startswith(f"peer; target={peer_id};"), route_header
    full = "".join(text)
    assert partial and full.startswith(partial) and len(full) > len(partial)
    assert finish == "length" and usage["completion_tokens"] == MAX_TOKENS
    posts = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    bodies = [p["body"] for p in posts if p["path"].endswith("/chat/completions")]
    assert len(bodies) == 1, "exactly one request reached the cloud: the resumed one"
    for value in SECRETS:
        assert value not in bodies[0], f"{value!r} leaked upstream"
    sent = json.loads(bodies[0])["messages"]
    assert "<PERSON_1>" in sent[0]["content"] and "<EMAIL_ADDRESS_1>" in sent[0]["content"]
    assert sent[-1]["role"] == "assistant" and sent[-1]["content"], "the cloud continues the partial answer"
    assert json.loads(bodies[0])["max_tokens"] < MAX_TOKENS
