"""Serving-quality verification across real ``potluck node start`` processes (issue 14).

Four nodes on loopback in one private swarm, each checking its peers every second
(``POTLUCK_VERIFY_INTERVAL_S=1``):

* ``a`` and ``b`` serve ``tinyshakespeare-f16.gguf`` as ``tinyshakespeare`` (honest holders);
* ``cheat`` serves ``tinyshakespeare-q4_0.gguf`` under the same model name and advertises
  the F16 file's SHA-256 and chunk root: its data dir's model-id cache was edited to say so (what a
  lying node would do; no test-only code path in the node);
* ``d`` serves another model and has no copy of the F16 file: it can check the holders only by
  proof of possession and majority votes, and it is where requests for ``tinyshakespeare`` are
  routed to peers.

The cheat is detected and excluded within a bounded time, the cluster views and ``potluck peers``
say why, honest holders stay in good standing, and ``d`` routes every request around the cheat.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from potluck.overlay.verification.fileid import hash_file, save_cached
from tests.e2e.procs import POTLUCK, NodeProcess, free_port, get_json, swarm_env
from tests.helpers import until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

MODEL = "tinyshakespeare"
DETECT_WITHIN_S = 90.0  # from the moment every node advertises its model


def node_env(home: Path, swarm: str, **extra: str) -> dict[str, str]:
    return swarm_env(
        home,
        swarm,
        "potluck-e2e-verify",
        "0",
        POTLUCK_VERIFY_INTERVAL_S="1",
        POTLUCK_ANTI_ENTROPY_INTERVAL_S="3",
        **extra,
    )


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_path):
    base = tmp_path_factory.mktemp("verify")
    name = f"verify-{os.getpid()}"
    f16, q4 = model_path("f16"), model_path("q4_0")
    # The cheat's data dir: its model-id cache claims the F16 file's identity for the Q4_0 file.
    save_cached(base / "cheat" / "data", q4, hash_file(f16))
    boot_port = free_port()
    nodes: dict[str, NodeProcess] = {}
    try:
        a = nodes["a"] = NodeProcess(
            base / "a",
            "-m",
            str(f16),
            "--p2p-port",
            str(boot_port),
            env=node_env(base / "a", name, POTLUCK_MODEL_NAME=MODEL),
        )
        a.wait_ready()
        addr = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{get_json(a.url + '/api/node')['peer_id']}"
        for key, path, extra in (
            ("b", f16, {"POTLUCK_MODEL_NAME": MODEL}),
            ("cheat", q4, {"POTLUCK_MODEL_NAME": MODEL}),  # --model-name in the config/env
            ("d", model_path("q8_0"), {}),
        ):
            nodes[key] = NodeProcess(
                base / key, "-m", str(path), "--bootstrap", addr, env=node_env(base / key, name, **extra)
            )
        for n in nodes.values():
            n.wait_ready()
        yield nodes
    finally:
        for n in nodes.values():
            n.stop()


def peer_id(node: NodeProcess) -> str:
    return get_json(node.url + "/api/node")["peer_id"]


def view_of(node: NodeProcess) -> dict[str, dict]:
    return {p["peer_id"]: p for p in get_json(node.url + "/api/cluster")["peers"]}


def advertised_sha(node: NodeProcess, about: str) -> str | None:
    models = view_of(node).get(about, {}).get("models", [])
    return next((m["sha256"] for m in models if m["id"] == MODEL), None)


def test_a_peer_serving_another_gguf_is_detected_excluded_and_routed_around(swarm, model_path):
    a, b, cheat, d = swarm["a"], swarm["b"], swarm["cheat"], swarm["d"]
    ids = {k: peer_id(n) for k, n in swarm.items()}
    f16_sha = hash_file(model_path("f16")).sha256

    # Every holder advertises the F16 hash, the cheat included (it lies).
    for k in ("a", "b", "cheat"):
        until(
            lambda k=k: advertised_sha(d, ids[k]) == f16_sha, 120, what=f"{k}'s hash in d's view", retry_on=(OSError,)
        )

    def excluded(node: NodeProcess, key: str) -> str | None:
        v = view_of(node).get(ids[key], {}).get("verification") or {}
        return v.get("excluded")

    # Detected and excluded, within a bounded time, by a holder (logprob challenge) and by the
    # node without the model (possession / majority), and stated in both cluster views.
    why_a = until(lambda: excluded(a, "cheat"), DETECT_WITHIN_S, what="a to exclude the cheat", retry_on=(OSError,))
    why_d = until(lambda: excluded(d, "cheat"), DETECT_WITHIN_S, what="d to exclude the cheat", retry_on=(OSError,))
    # A's exclusion names the first failing verdict it counts: its own logprob challenge, or a
    # verdict (possession / majority) signed by a peer it has itself found honest, whichever lands
    # first; either is a detection within the bound.
    assert "logprob" in why_a or "possession" in why_a or "majority" in why_a
    assert "possession" in why_d or "majority" in why_d or "logprob" in why_d

    # Honest holders: checked and passed, not excluded (the cheat's own verdicts against them are
    # signed but not counted: nobody found the cheat honest).
    def vouched(node: NodeProcess, key: str) -> dict | None:
        v = view_of(node).get(ids[key], {}).get("verification") or {}
        return v if v.get("passes", 0) >= 1 else None

    until(lambda: vouched(a, "b"), DETECT_WITHIN_S, what="a to pass b", retry_on=(OSError,))
    until(lambda: vouched(d, "a") and vouched(d, "b"), DETECT_WITHIN_S, what="d to pass a and b", retry_on=(OSError,))
    for node in (a, b, d):
        view = view_of(node)
        for k in ("a", "b"):
            if ids[k] in view and not view[ids[k]]["self"]:
                assert view[ids[k]]["verification"]["excluded"] is None, (k, view[ids[k]]["verification"])

    # potluck peers says why.
    out = subprocess.run(
        [*POTLUCK, "peers", "--url", d.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert out.returncode == 0, out.stderr
    assert "EXCLUDED" in out.stdout and "verification" in out.stdout

    # d routes requests for the model to a or b, never to the cheat.
    cheat_served = cheat.output().count(f"serving {MODEL} for a peer")
    for i in range(4):
        body = json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"ROMEO {i}:"}],
                "max_tokens": 8,
                "temperature": 0,
            }
        ).encode()
        req = urllib.request.Request(d.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert json.loads(resp.read())["choices"][0]["message"]["content"]
    assert cheat.output().count(f"serving {MODEL} for a peer") == cheat_served
    assert sum(n.output().count(f"serving {MODEL} for a peer") for n in (a, b)) >= 4
