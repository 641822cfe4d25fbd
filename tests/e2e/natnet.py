"""Real ``potluck node start`` processes inside the emulated internet (:mod:`tests.netem`).

Shared by ``tests/e2e/test_nat.py`` and ``bench/nat.py``. Every node's HTTP API listens on
127.0.0.1 inside its own namespace; the test reaches it with a socket opened in that namespace
(:meth:`tests.netem.Namespace.connect`), so no interface outside the namespaces is needed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.procs import POTLUCK, LoggedProcess, NodeExited, offline_env
from tests.helpers import until
from tests.netem import Internet, Namespace, NatType

API_PORT = 8080
# What a condition polled over HTTP inside a namespace may raise while the swarm is still settling
# (refused or reset connections, a non-200 answer, a half-filled view): ``until(..., retry_on=SETTLING)``.
SETTLING: tuple[type[BaseException], ...] = (OSError, AssertionError, ValueError, KeyError)
P2P_PORT = 4001


class _NsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, ns: Namespace, port: int, timeout: float) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self._ns = ns

    def connect(self) -> None:
        self.sock = self._ns.connect(("127.0.0.1", self.port), timeout=self.timeout or 10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NatNode(LoggedProcess):
    """A node process in namespace ``ns`` (public host or home LAN host)."""

    def __init__(self, ns: Namespace, home: Path, swarm: str, *args: str, env: dict[str, str] | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.ns = ns
        self.log = home / "node.log"
        self._fh = self.log.open("wb")
        node_env = offline_env(
            home,
            POTLUCK_P2P_HOST="0.0.0.0",
            POTLUCK_P2P_PORT=str(P2P_PORT),
            POTLUCK_SWARM=swarm,
            POTLUCK_SWARM_SECRET="potluck-nat-secret",
            POTLUCK_STATE_INTERVAL_S="2",
            POTLUCK_STATE_TTL_S="30",
            POTLUCK_ANTI_ENTROPY_INTERVAL_S="3",
            POTLUCK_N_THREADS="1",
            POTLUCK_NAT_CHECK_INTERVAL_S="10",
            POTLUCK_DHT_ENABLED="false",
            **(env or {}),
        )
        argv = [*POTLUCK, "node", "start", "--host", "127.0.0.1", "--port", str(API_PORT), *args]
        self.proc = ns.popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, env=node_env)
        self.peer_id = ""

    # ------------------------------------------------------------------ HTTP inside the namespace
    def request(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        conn = _NsHTTPConnection(self.ns, API_PORT, timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise AssertionError(f"{method} {path} -> {resp.status}: {data[:500]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def chat_stream(self, model: str, prompt: str, max_tokens: int, timeout: float = 120.0) -> Iterator[str]:
        """Yield the content deltas of a streamed chat completion."""
        conn = _NsHTTPConnection(self.ns, API_PORT, timeout)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise AssertionError(f"chat -> {resp.status}: {resp.read()[:500]!r}")
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content:
                        yield content
        finally:
            conn.close()

    def chat(self, model: str, prompt: str, max_tokens: int, timeout: float = 120.0) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        return self.request("POST", "/v1/chat/completions", body, timeout=timeout)  # type: ignore[no-any-return]

    def cluster(self) -> dict[str, Any]:
        return self.request("GET", "/api/cluster", timeout=10)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ lifecycle
    def wait_ready(self, timeout: float = 180.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise NodeExited(f"node exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                health = self.request("GET", "/healthz", timeout=3)
            except (OSError, AssertionError, ValueError):
                return False
            return bool(health.get("status") == "ok")

        until(ready, timeout, f"node in {self.ns.name} ready")
        self.peer_id = self.cluster()["peer_id"]

    def addr(self) -> str:
        """Our public multiaddr (only meaningful for a node on the public segment)."""
        return f"/ip4/{self.ns.ip}/tcp/{P2P_PORT}/p2p/{self.peer_id}"

    def peer(self, peer_id: str) -> dict[str, Any] | None:
        """This node's view of ``peer_id`` (its ``/api/cluster`` entry) or ``None``."""
        for p in self.cluster()["peers"]:
            if p["peer_id"] == peer_id:
                return p  # type: ignore[no-any-return]
        return None


@dataclass
class Swarm:
    net: Internet
    relays: list[NatNode]
    a: NatNode
    b: NatNode


@contextmanager
def nat_swarm(
    tmp: Path,
    model: Path,
    nat_a: NatType,
    nat_b: NatType,
    b_env: dict[str, str] | None = None,
    delay_ms: float = 0.0,
) -> Iterator[Swarm]:
    """Two public relays (r1 also the bootstrap node), A (no model) behind ``nat_a``, B serving
    ``model`` behind ``nat_b``; every node ready. Processes and namespaces are gone afterwards.
    ``delay_ms`` is the one-way delay of every link to the public segment (``tc netem``)."""
    name = f"nat-{os.getpid()}-{nat_a.value}-{nat_b.value}"
    nodes: list[NatNode] = []
    with Internet(delay_ms=delay_ms) as net:
        try:
            r1 = NatNode(net.add_public("r1"), tmp / "r1", name, "--relay")
            nodes.append(r1)
            r1.wait_ready()
            r2 = NatNode(net.add_public("r2"), tmp / "r2", name, "--relay", "--bootstrap", r1.addr())
            nodes.append(r2)
            r2.wait_ready()
            boots = ["--bootstrap", r1.addr(), "--bootstrap", r2.addr()]
            a = NatNode(net.add_home("a", nat_a).host, tmp / "a", name, *boots)
            b = NatNode(net.add_home("b", nat_b).host, tmp / "b", name, "-m", str(model), *boots, env=b_env)
            nodes += [a, b]
            a.wait_ready()
            b.wait_ready()
            yield Swarm(net, [r1, r2], a, b)
        except BaseException:
            for n in nodes:
                print(f"----- {n.ns.name} -----\n{n.output()[-6000:]}")
            raise
        finally:
            for n in nodes:
                n.stop(timeout=15)
