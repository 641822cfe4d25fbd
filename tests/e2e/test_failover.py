"""Kill the serving peer, twenty times: every stream still completes, and no error reaches the client.

Three real ``potluck node start`` processes on loopback: A and B serve the fixture model, the
client enters at C. Each trial streams one completion through C, SIGKILLs whichever of A and B
serves it (early: right after the first tokens; late: most of the answer already streamed), reads
the stream to its end, then restarts the killed peer (same identity, a fresh process) and waits
until C routes to it again. The peers stream at a capped rate so that a kill lands mid-stream.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.e2e.procs import NodeProcess, free_port, get_json, sse_events, swarm_env
from tests.helpers import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

SERVED = "tinyshakespeare-q8_0"  # served by A and B
OTHER = "tinyshakespeare-q4_0"  # C's own model
RATE_TPS = "30"  # tokens/s each peer streams to the swarm
MAX_TOKENS = 60
TRIALS = 20
SERVING_LINE = f"serving {SERVED} for a peer"
RESUMED_LINE = f"serving {SERVED} for a peer (resumed)"


def node_env(home: Path, swarm: str) -> dict[str, str]:
    return swarm_env(home, swarm, "potluck-failover-secret", RATE_TPS, POTLUCK_ANTI_ENTROPY_INTERVAL_S="2")


class Swarm:
    def __init__(self, base: Path, model_path) -> None:
        self.base = base
        self.name = f"failover-{os.getpid()}"
        self.model_path = model_path
        boot_port = free_port()
        self.client = NodeProcess(
            base / "c",
            "-m",
            str(model_path("q4_0")),
            "--p2p-port",
            str(boot_port),
            env=node_env(base / "c", self.name),
        )
        self.client.wait_ready()
        boot_id = get_json(self.client.url + "/api/node")["peer_id"]
        self.bootstrap = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{boot_id}"
        self.peers: dict[str, NodeProcess] = {}
        for name in ("a", "b"):
            self.peers[name] = self.start_peer(name)
        self.ids = {name: get_json(p.url + "/api/node")["peer_id"] for name, p in self.peers.items()}

    def start_peer(self, name: str) -> NodeProcess:
        home = self.base / name
        node = NodeProcess(
            home, "-m", str(self.model_path("q8_0")), "--bootstrap", self.bootstrap, env=node_env(home, self.name)
        )
        node.wait_ready()
        return node

    def routable(self, name: str) -> bool:
        """C would route the served model to peer ``name`` now."""
        explain = get_json(f"{self.client.url}/api/route/explain?model={SERVED}")
        return any(c["target"] == self.ids[name] and c["allowed"] for c in explain["candidates"])

    def connected(self, name: str) -> bool:
        """C admitted the (restarted) peer ``name`` on its current addresses; whether C's view has its
        model yet is left to chance, as after any restart (the record arrives by gossip)."""
        addrs = get_json(self.peers[name].url + "/api/cluster")["addrs"]
        view = get_json(self.client.url + "/api/cluster")
        return any(p["peer_id"] == self.ids[name] and p["admitted"] and p["addrs"] == addrs for p in view["peers"])

    def close(self) -> None:
        for node in [*self.peers.values(), self.client]:
            node.stop()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_path):
    s = Swarm(tmp_path_factory.mktemp("failover"), model_path)
    try:
        yield s
    finally:
        s.close()


def _stream(url: str) -> dict:
    body = {
        "model": SERVED,
        "messages": [{"role": "user", "content": "ROMEO:\nBut soft, what light"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return body


def _reference(url: str) -> str:
    """The whole greedy answer, streamed without a kill (kills aim at a share of its length)."""
    text = []
    for chunk in sse_events(url + "/v1/chat/completions", _stream(url), timeout=120):
        for choice in chunk.get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


def test_twenty_kills_of_the_serving_peer_all_complete(swarm):
    for name in swarm.peers:
        until(lambda name=name: swarm.routable(name), 60, what=f"C to route to peer {name}", retry_on=(OSError,))
    reference = _reference(swarm.client.url)
    assert reference
    outcomes = []
    for trial in range(TRIALS):
        late = trial % 2 == 1
        before = {n: p.output().count(SERVING_LINE) for n, p in swarm.peers.items()}
        resumed_before = {n: p.output().count(RESUMED_LINE) for n, p in swarm.peers.items()}
        text: list[str] = []
        errors: list[dict] = []
        finish = usage = killed = None
        for chunk in sse_events(swarm.client.url + "/v1/chat/completions", _stream(swarm.client.url), timeout=120):
            if "error" in chunk:
                errors.append(chunk)
                continue
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
            if killed is None and len("".join(text)) >= (len(reference) // 2 if late else 1):

                def serving(before: dict[str, int] = before) -> str | None:
                    return next((n for n, p in swarm.peers.items() if p.output().count(SERVING_LINE) > before[n]), None)

                killed = until(serving, 30, what="the serving peer's log line")
                swarm.peers[killed].proc.send_signal(signal.SIGKILL)
                swarm.peers[killed].proc.wait(30)
        outcomes.append(
            {"trial": trial, "late": late, "killed": killed, "errors": errors, "finish": finish, "usage": usage}
        )
        assert killed is not None, f"trial {trial}: the stream ended before it could be interrupted"
        assert errors == [], f"trial {trial} ({'late' if late else 'early'} kill): {json.dumps(outcomes[-1])}"
        assert finish == "length", outcomes[-1]
        assert usage is not None and usage["completion_tokens"] == MAX_TOKENS, outcomes[-1]
        survivor = next(n for n in swarm.peers if n != killed)
        assert swarm.peers[survivor].output().count(RESUMED_LINE) > resumed_before[survivor], (
            f"trial {trial}: the kill did not land mid-stream (the survivor resumed nothing)"
        )
        swarm.peers[killed].stop()
        swarm.peers[killed] = swarm.start_peer(killed)
        until(lambda k=killed: swarm.connected(k), 60, what=f"C to admit the restarted peer {killed}")
    assert len(outcomes) == TRIALS
