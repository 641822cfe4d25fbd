"""The emulated internet itself: mappings of each NAT type, filtering, hole punching, teardown."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.netem import Internet, NatType, cleanup_stale, missing_requirements
from tests.netem.netns import Namespace, list_namespaces, sh

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]

ECHO_PORTS = (7001, 7002)
SRC_PORT = 40000


class Echo:
    """TCP and UDP servers in a namespace that answer with the client's address as they saw it."""

    def __init__(self, ns: Namespace, port: int) -> None:
        self.tcp = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", port))
        self.tcp.listen(16)
        self.udp = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", port))
        self._threads = [
            threading.Thread(target=self._serve_tcp, daemon=True),
            threading.Thread(target=self._serve_udp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, (ip, port) = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{ip}:{port}".encode())

    def _serve_udp(self) -> None:
        while True:
            try:
                _, addr = self.udp.recvfrom(64)
                if not addr:  # woken by shutdown()
                    return
                self.udp.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)
            except OSError:
                return

    def close(self) -> None:
        for s in (self.tcp, self.udp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def net() -> Iterator[Internet]:
    with Internet() as internet:
        yield internet


def _servers(net: Internet) -> tuple[list[tuple[str, int]], list[Echo]]:
    s1, s2 = net.add_public("echo1"), net.add_public("echo2")
    echoes = [Echo(ns, port) for ns in (s1, s2) for port in ECHO_PORTS]
    dests = [(ns.ip, port) for ns in (s1, s2) for port in ECHO_PORTS]
    return dests, echoes


def _observed_tcp(ns: Namespace, dest: tuple[str, int]) -> tuple[str, int]:
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(5)
    with sock:
        sock.bind(("0.0.0.0", SRC_PORT))
        sock.connect(dest)
        ip, port = sock.recv(64).decode().split(":")
    return ip, int(port)


def _observed_udp(sock: socket.socket, dest: tuple[str, int]) -> tuple[str, int]:
    sock.sendto(b"?", dest)
    ip, port = sock.recv(64).decode().split(":")
    return ip, int(port)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_eim_nat_preserves_the_port_toward_every_destination(net: Internet, proto: str) -> None:
    home = net.add_home("a", NatType.EIM)
    dests, echoes = _servers(net)
    try:
        if proto == "tcp":
            seen = [_observed_tcp(home.host, d) for d in dests]
        else:
            with home.host.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.bind(("0.0.0.0", SRC_PORT))
                seen = [_observed_udp(sock, d) for d in dests]
    finally:
        for e in echoes:
            e.close()
    # Every destination sees the router's WAN address and the host's own source port.
    assert seen == [(home.router.ip, SRC_PORT)] * len(dests)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_symmetric_nat_maps_each_destination_to_a_random_port(net: Internet, proto: str) -> None:
    home = net.add_home("b", NatType.SYMMETRIC)
    dests, echoes = _servers(net)
    try:
        if proto == "tcp":
            seen = [_observed_tcp(home.host, d) for d in dests]
        else:
            with home.host.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.bind(("0.0.0.0", SRC_PORT))
                seen = [_observed_udp(sock, d) for d in dests]
    finally:
        for e in echoes:
            e.close()
    assert {ip for ip, _ in seen} == {home.router.ip}
    ports = [port for _, port in seen]
    # --random-fully: a fresh random port per flow (P(any equals the source port) ~ 4/28000).
    assert len(set(ports)) == len(dests), ports
    assert SRC_PORT not in ports


def test_nat_filters_unsolicited_inbound(net: Internet) -> None:
    home = net.add_home("a", NatType.EIM)
    outsider = net.add_public("outsider")
    server = home.host.socket()
    server.bind(("0.0.0.0", 7100))
    server.listen(4)
    try:
        # No route from the public segment to the home LAN...
        with pytest.raises(OSError) as lan:
            outsider.connect((home.host.ip, 7100), timeout=2).close()
        assert lan.value.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)
        # ...and the router's WAN address has no mapping for the port: dropped silently.
        with pytest.raises(OSError):
            outsider.connect((home.router.ip, 7100), timeout=1.5).close()
    finally:
        server.close()


def _punch(ns: Namespace, port: int, peer: tuple[str, int], out: dict[str, object], key: str) -> None:
    """Repeatedly dial ``peer`` from our fixed ``port`` (TCP simultaneous open, RFC 793 §3.4)."""
    for _ in range(4):
        sock = ns.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.settimeout(2.5)
        sock.bind(("0.0.0.0", port))
        try:
            sock.connect(peer)
            sock.sendall(key.encode())
            out[key] = sock.recv(16).decode()
            sock.close()
            return
        except OSError as exc:
            out[key] = exc
            sock.close()


def _hole_punch(net: Internet, nat_a: NatType, nat_b: NatType) -> dict[str, object]:
    a, b = net.add_home("a", nat_a), net.add_home("b", nat_b)
    out: dict[str, object] = {}
    threads = [
        threading.Thread(target=_punch, args=(a.host, 41000, (b.router.ip, 42000), out, "a")),
        threading.Thread(target=_punch, args=(b.host, 42000, (a.router.ip, 41000), out, "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_tcp_hole_punching_works_between_two_eim_nats(net: Internet) -> None:
    out = _hole_punch(net, NatType.EIM, NatType.EIM)
    # Each side received what the other sent over the one simultaneously opened connection.
    assert out == {"a": "b", "b": "a"}, out


def test_tcp_hole_punching_fails_against_a_symmetric_nat(net: Internet) -> None:
    out = _hole_punch(net, NatType.EIM, NatType.SYMMETRIC)
    assert isinstance(out["a"], OSError) and isinstance(out["b"], OSError), out


def test_processes_run_inside_and_teardown_removes_everything() -> None:
    with Internet() as net:
        home = net.add_home("a", NatType.EIM)
        relay = net.add_public("relay")
        names = net.namespaces()
        assert set(names) <= set(list_namespaces())
        proc = home.host.popen(["sleep", "300"])
        routes = home.host.run("ip", "route").stdout
        assert "default via 10.1.0.1" in routes
        echo = Echo(relay, ECHO_PORTS[0])
        client = (
            "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 5); "
            "print(s.recv(64).decode())"
        )
        try:
            seen = home.host.run(sys.executable, "-c", client, relay.ip, str(ECHO_PORTS[0])).stdout.strip()
        finally:
            echo.close()
        # A process inside the home LAN reaches the public host through the NAT.
        assert seen.split(":")[0] == home.router.ip
    # The process inside was killed and every namespace is gone.
    assert proc.wait(10) != 0
    assert not set(names) & set(list_namespaces())


def test_teardown_after_a_failure_and_stale_cleanup() -> None:
    with pytest.raises(RuntimeError), Internet() as net:
        net.add_home("a", NatType.SYMMETRIC)
        names = net.namespaces()
        raise RuntimeError("test failed")
    assert not set(names) & set(list_namespaces())
    # A namespace left behind by a dead owner process is cleaned up by the next Internet.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"pnem{int(dead.stdout)}x0-left"
    sh("ip", "netns", "add", stale)
    assert stale in cleanup_stale()
    assert stale not in list_namespaces()
