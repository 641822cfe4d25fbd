"""LAN discovery for real: a small LAN of network namespaces (one bridge namespace, one namespace
per node, veth links, multicast on), nodes started WITHOUT any bootstrap address find each other
through zeroconf and join. Needs root and iproute2; everything lives in namespaces this test
creates and deletes (also on failure), nothing touches the host's own network namespace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.procs import offline_env
from tests.helpers import until

IP = shutil.which("ip")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces (not root)"),
    pytest.mark.skipif(IP is None, reason="needs iproute2's `ip` to create network namespaces (not found)"),
]

N_NODES = 3


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def lan():
    """Namespaces ``plk<pid>-n<i>`` on a bridge in namespace ``plk<pid>-br``; yields the node namespaces."""
    tag = f"plk{os.getpid() % 100000}"
    bridge_ns = f"{tag}-br"
    nodes = [f"{tag}-n{i}" for i in range(N_NODES)]
    created: list[str] = []
    try:
        ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(nodes):
            ip("netns", "add", ns)
            created.append(ns)
            # The veth pair is born inside the node namespace; its peer moves into the bridge namespace.
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"vb{i}", "netns", bridge_ns)
            ip("-n", bridge_ns, "link", "set", f"vb{i}", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"10.77.0.{i + 1}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        yield nodes
    finally:
        for ns in reversed(created):
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=30)


def start_node(ns: str, home: Path, model: Path, swarm: str) -> tuple[subprocess.Popen, Path]:
    home.mkdir(parents=True, exist_ok=True)
    env = offline_env(
        home,
        POTLUCK_P2P_HOST="0.0.0.0",
        POTLUCK_P2P_PORT="0",
        POTLUCK_LAN_DISCOVERY="true",
        POTLUCK_SWARM=swarm,
        POTLUCK_STATE_INTERVAL_S="1",
        POTLUCK_N_THREADS="1",
    )
    log = home / "node.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [IP, "netns", "exec", ns, sys.executable, "-m", "potluck.cli", "node", "start",
             "--port", "8642", "-m", str(model)],
            stdout=fh, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    return proc, log


def cluster(ns: str) -> dict | None:
    out = subprocess.run(
        [IP, "netns", "exec", ns, sys.executable, "-m", "potluck.cli", "peers", "--json",
         "--url", "http://127.0.0.1:8642"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)


def test_nodes_on_a_lan_find_each_other_without_bootstrap(lan, tmp_path, model_path):
    swarm = f"lan-{os.getpid()}"
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for i, ns in enumerate(lan):
            procs.append(start_node(ns, tmp_path / f"n{i}", model_path("q4_0"), swarm))
        views: dict[str, dict | None] = {}

        def all_found() -> bool:
            for proc, log in procs:
                assert proc.poll() is None, f"node exited:\n{log.read_text(errors='replace')}"
            views.update({ns: cluster(ns) for ns in lan})
            return all(v is not None and len(v["peers"]) == N_NODES for v in views.values())

        try:
            until(all_found, 180, "the nodes to find each other", interval=1.0)
        except AssertionError as exc:
            logs = "\n\n".join(log.read_text(errors="replace")[-3000:] for _, log in procs)
            raise AssertionError(f"{exc}: {views}\n{logs}") from None
        ids = {v["peer_id"] for v in views.values() if v}
        for view in views.values():
            assert view is not None
            assert {p["peer_id"] for p in view["peers"]} == ids
            others = [p for p in view["peers"] if not p["self"]]
            assert all(p["admitted"] for p in others)
            # They met on the LAN addresses, not loopback.
            assert all(any("/ip4/10.77.0." in a for a in p["addrs"]) for p in others)
        assert any("zeroconf: joined peer" in log.read_text(errors="replace") for _, log in procs)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
