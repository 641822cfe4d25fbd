"""Three real ``potluck node start`` processes on loopback, joined through a bootstrap node:
they see each other (``/api/cluster``, ``potluck peers``), a node without a model forwards to a
peer that has it, and killing the serving peer mid-stream still yields one complete answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.procs import POTLUCK, NodeProcess, free_port, get_json, sse_events, swarm_env
from tests.helpers import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SERVED = "tinyshakespeare-q8_0"  # served by the two peers
OTHER = "tinyshakespeare-q4_0"  # the bootstrap node's own model
RATE_TPS = "20"  # the peers stream at most 20 tokens/s to the swarm, so a kill lands mid-stream


def node_env(home: Path, swarm: str) -> dict[str, str]:
    return swarm_env(home, swarm, "potluck-e2e-secret", RATE_TPS, POTLUCK_ANTI_ENTROPY_INTERVAL_S="3")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_path):
    base = tmp_path_factory.mktemp("swarm")
    name = f"e2e-{os.getpid()}"
    boot_port = free_port()
    nodes: list[NodeProcess] = []
    try:
        boot = NodeProcess(
            base / "boot",
            "-m",
            str(model_path("q4_0")),
            "--p2p-port",
            str(boot_port),
            env=node_env(base / "boot", name),
        )
        nodes.append(boot)
        boot.wait_ready()
        boot_id = get_json(boot.url + "/api/node")["peer_id"]
        addr = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{boot_id}"
        for i in range(2):
            home = base / f"peer{i}"
            nodes.append(
                NodeProcess(home, "-m", str(model_path("q8_0")), "--bootstrap", addr, env=node_env(home, name))
            )
        for n in nodes[1:]:
            n.wait_ready()
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def peer_ids(node: NodeProcess) -> set[str]:
    try:
        return {p["peer_id"] for p in get_json(node.url + "/api/cluster")["peers"]}
    except OSError:
        return set()


def served_models(node: NodeProcess) -> list[list[str]]:
    """The models each peer in ``node``'s view advertises, sorted."""
    view = get_json(node.url + "/api/cluster")
    return sorted([m["id"] for m in p["models"]] for p in view["peers"])


def test_three_nodes_see_each_other(swarm):
    ids = {get_json(n.url + "/api/node")["peer_id"] for n in swarm}
    assert len(ids) == 3
    for n in swarm:
        until(lambda n=n: peer_ids(n) == ids, 120, what=f"{n.url} to see all three peers")
    # A peer's first record can predate its model load; the next heartbeat carries the model.
    expected = sorted([[OTHER], [SERVED], [SERVED]])
    until(lambda: served_models(swarm[0]) == expected, 120, what="every peer's models in the cluster view")
    view = get_json(swarm[0].url + "/api/cluster")
    assert all(p["admitted"] or p["self"] for p in view["peers"])

    out = subprocess.run(
        [*POTLUCK, "peers", "--url", swarm[1].url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert out.returncode == 0, out.stderr
    for pid in ids:
        assert pid in out.stdout
    assert SERVED in out.stdout and "this node" in out.stdout


def test_models_lists_the_swarm_and_a_peer_serves_the_request(swarm):
    boot = swarm[0]
    until(lambda: peer_ids(boot) and len(peer_ids(boot)) == 3, 120, what="the swarm")

    def listed() -> dict[str, str]:
        return {m["id"]: m["owned_by"] for m in get_json(boot.url + "/v1/models")["data"]}

    models = until(lambda: SERVED in listed() and listed(), 120, what=f"{SERVED} in /v1/models")
    assert models[OTHER] == "local" and models[SERVED] != "local"
    body = json.dumps(
        {"model": SERVED, "messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 12, "temperature": 0}
    ).encode()
    req = urllib.request.Request(boot.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())
    assert answer["model"] == SERVED
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0
    assert any("serving tinyshakespeare-q8_0 for a peer" in n.output() for n in swarm[1:])
    assert "serving tinyshakespeare-q8_0 for a peer" not in boot.output()


def test_killing_the_serving_peer_mid_stream_still_completes(swarm):
    boot, peers = swarm[0], swarm[1:]
    until(lambda: len(peer_ids(boot)) == 3, 120, what="the swarm")
    expected = sorted([[OTHER], [SERVED], [SERVED]])
    until(lambda: served_models(boot) == expected, 120, what="both peers advertising the model")
    served_before = [n.output().count("serving tinyshakespeare-q8_0 for a peer") for n in peers]
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": "ROMEO:\nBut soft, what light"}],
        "max_tokens": 80,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, finish, usage, errors, killed = [], None, None, [], None
    for chunk in sse_events(boot.url + "/v1/chat/completions", body, timeout=180):
        if "error" in chunk:
            errors.append(chunk)
            continue
        for choice in chunk.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                text.append(piece)
            finish = choice.get("finish_reason") or finish
        usage = chunk.get("usage") or usage
        if killed is None and text:
            # The first tokens are here: find the peer that serves this stream and kill it.
            def serving():
                for n, before in zip(peers, served_before, strict=True):
                    if n.output().count("serving tinyshakespeare-q8_0 for a peer") > before:
                        return n
                return None

            killed = until(serving, 30, what="the serving peer's log line")
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(30)
            partial = "".join(text)
    assert errors == []
    assert killed is not None, "the stream ended before it could be interrupted"
    survivor = next(n for n in peers if n is not killed)
    assert "serving tinyshakespeare-q8_0 for a peer (resumed)" in survivor.output()
    full = "".join(text)
    assert full.startswith(partial) and len(full) > len(partial)
    assert finish == "length"
    assert usage is not None and usage["completion_tokens"] >= 80
    metrics = urllib.request.urlopen(boot.url + "/metrics", timeout=10).read().decode()
    assert "potluck_overlay_forward_resumes_total 1.0" in metrics
