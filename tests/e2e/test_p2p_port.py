"""Two real ``potluck node start`` processes on one machine asked for the same ``--p2p-port``.

py-libp2p listens with SO_REUSEPORT, so before the fix both processes listened on the port at once
and the kernel split incoming connections between them. Now the second one falls back to a free
port, says which, and the two form a swarm like any other pair."""

from __future__ import annotations

import pytest

from tests.e2e.procs import NodeProcess, free_port, get_json, offline_env, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def tcp_ports(node: NodeProcess) -> set[int]:
    try:
        addrs = get_json(node.url + "/api/cluster", timeout=5)["addrs"]
    except OSError:
        return set()
    return {int(a.split("/tcp/")[1].split("/")[0]) for a in addrs if "/tcp/" in a}


def test_second_node_does_not_share_a_taken_p2p_port(tmp_path, model_path):
    port = free_port()
    model = str(model_path("q4_0"))
    a = NodeProcess(tmp_path / "a", "-m", model, "--p2p-port", str(port), env=offline_env(tmp_path / "a"))
    b = None
    try:
        assert until(lambda: tcp_ports(a), 60, "node a's overlay") == {port}
        b = NodeProcess(tmp_path / "b", "-m", model, "--p2p-port", str(port), env=offline_env(tmp_path / "b"))
        b_ports = until(lambda: tcp_ports(b), 60, "node b's overlay")
        assert port not in b_ports, f"both nodes listen on {port}:\n{b.output()}"
        log = until(lambda: "already in use" in b.output() and b.output(), 10, "b's warning")
        assert f":{port} is already in use" in log and f"free port {min(b_ports)}" in log and "--p2p-port" in log
        assert a.proc.poll() is None and b.proc.poll() is None
        assert b.stop() == 0, b.output()
        assert a.stop() == 0, a.output()
    finally:
        for node in (b, a):
            if node is not None:
                node.stop()
