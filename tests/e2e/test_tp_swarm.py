"""Tensor parallelism across real ``potluck node start`` processes on loopback.

Two worker nodes (each serving another model, so neither has the GGUF the master serves) form a
swarm; a master started with ``--tensor-parallel N`` and the F32/F16 fixture picks them from the
cluster state, sends each its shard over the star's authenticated channel, and serves
``/v1/completions`` whose greedy text equals llama.cpp's on the same GGUF: over direct TCP, over the
libp2p-stream fallback, and with a worker killed mid-generation (the master re-plans over the
survivor and replays). The workers cap the forward passes they serve (``serve_rate_limit_tps``) so
a generation lasts long enough to be interrupted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.procs import POTLUCK, NodeProcess, free_port, get_json, sse_events, swarm_env
from tests.sharding.llama_ref import STEADY_PROMPT, greedy_tokens

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RATE_TPS = "25"


def node_env(home: Path, swarm: str) -> dict[str, str]:
    return swarm_env(
        home,
        swarm,
        "potluck-tp-e2e-secret",
        RATE_TPS,
        POTLUCK_ANTI_ENTROPY_INTERVAL_S="2",
        POTLUCK_DHT_ENABLED="false",
    )


def reference_text(path: Path, n: int) -> str:
    from potluck.sharding.format.tokenizer import GGUFTokenizer

    _, want = greedy_tokens(path, STEADY_PROMPT, n)
    tok = GGUFTokenizer(path)
    try:
        return tok.detokenize(want)
    finally:
        tok.close()


def start_workers(base: Path, name: str, nodes: list[NodeProcess], model_path, *args: str) -> str:  # type: ignore[no-untyped-def]
    """Two worker nodes (serving the Q8_0 and Q4_0 fixtures, not the F32/F16 the masters serve),
    appended to ``nodes`` as they start; ``args`` go to both. Returns the bootstrap multiaddr."""
    boot_port = free_port()
    boot = NodeProcess(
        base / "w1", "-m", str(model_path("q8_0")), "--p2p-port", str(boot_port), *args, env=node_env(base / "w1", name)
    )
    nodes.append(boot)
    boot.wait_ready()
    boot_addr = f"/ip4/127.0.0.1/tcp/{boot_port}/p2p/{get_json(boot.url + '/api/node')['peer_id']}"
    w2 = NodeProcess(
        base / "w2", "-m", str(model_path("q4_0")), "--bootstrap", boot_addr, *args, env=node_env(base / "w2", name)
    )
    nodes.append(w2)
    w2.wait_ready()
    return boot_addr


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_path):
    base = tmp_path_factory.mktemp("tp-swarm")
    name = f"tp-e2e-{os.getpid()}"
    nodes: list[NodeProcess] = []
    try:
        boot_addr = start_workers(base, name, nodes, model_path)
        yield {"base": base, "name": name, "boot_addr": boot_addr, "workers": nodes}
    finally:
        for n in nodes:
            n.stop()


def start_master(swarm: dict, home: str, path: Path, *args: str) -> NodeProcess:
    root = swarm["base"] / home
    master = NodeProcess(
        root,
        "-m",
        str(path),
        "--bootstrap",
        swarm["boot_addr"],
        *args,
        env=node_env(root, swarm["name"]),
    )
    try:
        master.wait_ready(timeout=240)
    except AssertionError:
        master.stop()
        raise
    return master


def complete(master: NodeProcess, model: str, n: int) -> dict:
    body = json.dumps({"model": model, "prompt": STEADY_PROMPT, "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(master.url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=240) as resp:
        return json.loads(resp.read())


def complete_once(swarm: dict, home: str, path: Path, n: int, *args: str) -> tuple[dict, str]:
    """Start a master with ``args``, complete ``n`` greedy tokens, stop it; its answer and its log."""
    master = start_master(swarm, home, path, *args)
    try:
        return complete(master, path.stem, n), master.output()
    finally:
        master.stop()


def test_tp_group_over_tcp_with_shard_transfer_equals_llama_cpp(swarm, model_path):
    path = model_path("f32")
    answer, log = complete_once(swarm, "m-tcp", path, 48, "--tensor-parallel", "3")
    assert answer["choices"][0]["text"] == reference_text(path, 48)
    assert answer["usage"]["completion_tokens"] == 48
    assert "tensor-parallel group up: 3 ranks" in log
    for worker in swarm["workers"]:
        out = worker.output()
        assert "joined the star over tcp" in out
        assert "received from the master" in out  # neither worker has the F32 GGUF
        shards = list((worker.log.parent / "cache" / "tp-cache").rglob("shard.bin"))
        assert shards, "the transferred shard is cached by (model hash, plan hash)"


def test_libp2p_stream_fallback_produces_the_same_tokens(swarm, model_path):
    path = model_path("f16")
    before = [w.output().count("joined the star over libp2p") for w in swarm["workers"]]
    answer, log = complete_once(swarm, "m-libp2p", path, 48, "--tensor-parallel", "2", "--tp-transport", "libp2p")
    assert answer["choices"][0]["text"] == reference_text(path, 48)
    assert "via libp2p" in log and "tensor-parallel group up: 2 ranks" in log
    after = [w.output().count("joined the star over libp2p") for w in swarm["workers"]]
    assert sum(after) == sum(before) + 1


def test_a_master_over_its_memory_budget_streams_its_layers_with_the_same_tokens(swarm, model_path):
    path = model_path("f32")
    answer, log = complete_once(swarm, "m-budget", path, 48, "--tensor-parallel", "2", "--memory-budget", "3MiB")
    assert answer["choices"][0]["text"] == reference_text(path, 48)
    assert "tensor-parallel group up: 2 ranks" in log
    assert "layers resident at once" in log  # rank 0 keeps a window of its 4 layers' slices
    assert list((swarm["base"] / "m-budget" / "cache" / "tp-spill").rglob("l0.attn.data"))


def test_too_few_peers_fail_with_a_clear_error(swarm, model_path):
    root = swarm["base"] / "m-short"
    env = {**node_env(root, swarm["name"]), "POTLUCK_TP_JOIN_TIMEOUT_S": "6"}
    args = ("-m", str(model_path("f32")), "--bootstrap", swarm["boot_addr"], "--tensor-parallel", "4")
    master = NodeProcess(root, *args, env=env)
    try:
        master.proc.wait(120)
    finally:
        master.stop()
    assert master.proc.returncode != 0
    assert "the group needs 3" in master.output()


def test_killing_a_worker_mid_generation_still_completes(swarm, model_path):
    path = model_path("f32")
    n = 120
    master = start_master(swarm, "m-kill", path, "--tensor-parallel", "3")
    victim = swarm["workers"][1]
    body = {"model": "tinyshakespeare-f32", "prompt": STEADY_PROMPT, "max_tokens": n, "temperature": 0, "stream": True}
    text: list[str] = []
    errors: list[dict] = []
    finish = None
    killed_after = None
    try:
        for chunk in sse_events(master.url + "/v1/completions", body, timeout=300):
            if "error" in chunk:
                errors.append(chunk)
                continue
            for choice in chunk.get("choices", []):
                text.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
            if killed_after is None and "".join(text):
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait(30)
                killed_after = time.monotonic()
                partial = "".join(text)
        log = master.output()
    finally:
        master.stop()
    assert errors == []
    assert killed_after is not None
    full = "".join(text)
    assert len(full) > len(partial), "the generation ended before the kill landed"
    assert full == reference_text(path, n)
    assert finish == "length"
    assert "re-planning" in log
    assert "tensor-parallel group up: 2 ranks" in log


def test_a_model_larger_than_every_nodes_budget_is_served_by_the_group_the_planner_sizes(tmp_path, model_path):
    """Three nodes, each with --memory-budget 4MiB, and the 13.6 MB F32 model: no node can hold it,
    and the master alone cannot hold even one layer beside its head, so the cost model must form a
    group (--tensor-parallel left at 0) whose ranks each stream a window of their share."""
    path = model_path("f32")
    budget = ("--memory-budget", "4MiB")
    name = f"tp-budget-{os.getpid()}"
    nodes: list[NodeProcess] = []
    try:
        boot_addr = start_workers(tmp_path, name, nodes, model_path, *budget)
        master = start_master({"base": tmp_path, "name": name, "boot_addr": boot_addr}, "m", path, *budget)
        nodes.append(master)
        answer = complete(master, path.stem, 48)
        log = " ".join(master.output().split())  # rich wraps long lines
        cmd = ["shard", "plan", "-m", str(path), "--ctx", "512", "--predict", "--swarm", "--url", master.url]
        forecast = subprocess.run([*POTLUCK, *cmd, "--json"], capture_output=True, text=True, timeout=120)
        refused = subprocess.run([*POTLUCK, *cmd, "--link", "wifi"], capture_output=True, text=True, timeout=120)
    finally:
        for n in nodes:
            n.stop()
    assert answer["choices"][0]["text"] == reference_text(path, 48)
    assert "does not fit this node's memory budget" in log
    choice = re.search(r"tensor-parallel planner: (.*) -> (\d+) ranks", log)
    assert choice, log[-3000:]
    assert "1 rank(s) infeasible (" in choice.group(1) and "needs a budget of" in choice.group(1)
    ranks = int(choice.group(2))
    assert ranks >= 2 and f"tensor-parallel group up: {ranks} ranks" in log
    assert "layers resident at once" in log  # the master streams its share
    joined = [re.search(r"MB share, (\d+) of (\d+) layers resident", " ".join(w.output().split())) for w in nodes[:2]]
    windows = [(int(m.group(1)), int(m.group(2))) for m in joined if m]
    assert len(windows) == ranks - 1 and all(w < layers for w, layers in windows)  # so do the workers
    # `shard plan --predict --swarm` shows what the master's planner saw, from its cluster view
    assert forecast.returncode == 0, forecast.stderr
    groups = json.loads(forecast.stdout)
    assert [g["nodes"] for g in groups["groups"]] == [1, 2, 3] and groups["pick"] >= 2
    assert groups["groups"][0]["short"] and all(g["ranks"][0]["window"] >= 1 for g in groups["groups"][1:])
    assert refused.returncode != 0 and "--link does not apply with --predict --swarm" in refused.stderr
