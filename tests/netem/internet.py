"""An emulated internet: a public segment, public hosts, and home routers doing NAT.

Topology (every box is a network namespace this module creates; nothing outside them is touched)::

    public host  198.18.0.x ──┐
    public host  198.18.0.y ──┤  switch namespace: bridge br0 (the "internet", 198.18.0.0/24)
    router A wan 198.18.0.a ──┤
    router B wan 198.18.0.b ──┘
       │ NAT (iptables in router A's namespace)
    router A lan 10.1.0.1 ── home host A 10.1.0.2 (default route via 10.1.0.1)

Addresses: the public segment uses the RFC 2544 benchmarking range (198.18.0.0/24, inside
198.18.0.0/15), which py-libp2p counts as public; home LANs use RFC 1918 ``10.<n>.0.0/24``, which
it counts as private. Both exist only inside the namespaces created here.

NAT types (RFC 4787 terms), both built from Linux conntrack + iptables in the router namespace:

* :attr:`NatType.EIM` - ``MASQUERADE``: endpoint-independent, port-preserving mapping (a LAN socket
  keeps its source port toward every destination) with address-and-port-dependent filtering
  (only replies to outbound flows get in). TCP hole punching (simultaneous open) works.
* :attr:`NatType.SYMMETRIC` - ``MASQUERADE --random-fully``: endpoint-dependent mapping, a random
  external port per flow, so the port a peer learns through a relay is useless for punching.

Forwarding from the WAN into the LAN is allowed only for established/related flows, unsolicited
packets to a router are dropped silently (no RST), and the public hosts have no route to the
LANs, so a home host is unreachable from outside except through mappings its own traffic created.

Usage::

    with Internet() as net:
        relay = net.add_public("relay")
        a = net.add_home("a", NatType.EIM)
        a.host.popen([...])          # a process inside home A's LAN
        sock = relay.socket()        # a socket inside the relay's namespace

Teardown (``__exit__``, also after an exception) kills every process inside the namespaces and
deletes them; entering first deletes namespaces left behind by a dead earlier run (same prefix,
owner process gone).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import re
from dataclasses import dataclass
from types import TracebackType

from tests.netem.netns import Namespace, NetemError, delete_namespace, list_namespaces, process_alive, sh

log = logging.getLogger(__name__)

PREFIX = "pnem"  # every namespace of this module: pnem<owner pid>x<serial>-<role>
PUBLIC_NET = "198.18.0"
PUBLIC_PREFIXLEN = 24
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)x\d+-")
_serial = itertools.count()


class NatType(enum.Enum):
    """Mapping behaviour of a home router (RFC 4787 §4.1)."""

    EIM = "eim"  # endpoint-independent, port-preserving (full/port-restricted cone)
    SYMMETRIC = "symmetric"  # endpoint-dependent, random port per flow


@dataclass(frozen=True)
class Home:
    """A home network: its router (NAT) and the one host on its LAN."""

    name: str
    nat: NatType
    router: Namespace  # router.ip is the WAN address on the public segment
    host: Namespace  # host.ip is the LAN address
    lan_gateway: str


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces of this module whose owner process is gone; return their names."""
    removed = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if not name.startswith(prefix) or m is None:
            continue
        owner = int(m.group(1))
        if owner == os.getpid() or process_alive(owner):
            continue
        log.info("removing stale namespace %s (owner %d is gone)", name, owner)
        delete_namespace(name)
        removed.append(name)
    return removed


class Internet:
    """The emulated internet (a context manager; see the module docstring).

    Args:
        delay_ms: one-way delay added on every router's WAN link and every public host's link
            (``tc netem``), 0 for none. Models the internet's latency in benchmarks.
    """

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.tag = f"{PREFIX}{os.getpid()}x{next(_serial)}"
        self.delay_ms = delay_ms
        self.switch = Namespace(f"{self.tag}-net", "")
        self.publics: dict[str, Namespace] = {}
        self.homes: dict[str, Home] = {}
        self._names: list[str] = []
        self._next_public = 2
        self._next_home = 1
        self._next_port = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Internet:
        cleanup_stale()
        try:
            self._add_namespace(self.switch.name)
            self.switch.run("ip", "link", "add", "br0", "type", "bridge")
            self.switch.run("ip", "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill the processes inside and delete every namespace (idempotent)."""
        for name in reversed(self._names):
            delete_namespace(name)
        self._names.clear()

    def _add_namespace(self, name: str) -> Namespace:
        sh("ip", "netns", "add", name)
        self._names.append(name)
        ns = Namespace(name, "")
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def _attach_to_switch(self, ns: Namespace, ifname: str, ip: str) -> None:
        """A veth pair: ``ifname`` in ``ns`` with ``ip``/24, its peer a port of the public bridge."""
        port = f"p{self._next_port}"
        self._next_port += 1
        self.switch.run("ip", "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", ns.name)
        self.switch.run("ip", "link", "set", port, "master", "br0", "up")
        ns.run("ip", "addr", "add", f"{ip}/{PUBLIC_PREFIXLEN}", "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")
        if self.delay_ms > 0:
            ns.run("tc", "qdisc", "add", "dev", ifname, "root", "netem", "delay", f"{self.delay_ms}ms")

    # ------------------------------------------------------------------ building blocks
    def add_public(self, name: str) -> Namespace:
        """A host on the public segment (bootstrap node, relay, echo server).

        Raises:
            NetemError: a command failed (the namespace is removed on exit all the same).
        """
        if name in self.publics or name in self.homes:
            raise NetemError(f"{name!r} already exists")
        ip = f"{PUBLIC_NET}.{self._next_public}"
        self._next_public += 1
        ns = self._add_namespace(f"{self.tag}-{name}")
        ns.ip = ip
        self._attach_to_switch(ns, "eth0", ip)
        self.publics[name] = ns
        return ns

    def add_home(self, name: str, nat: NatType) -> Home:
        """A home router doing ``nat`` on the public segment, with one host on its LAN.

        Raises:
            NetemError: a command failed (for instance ``iptables`` lacks ``--random-fully``).
        """
        if name in self.publics or name in self.homes:
            raise NetemError(f"{name!r} already exists")
        n = self._next_home
        self._next_home += 1
        wan_ip = f"{PUBLIC_NET}.{100 + n}"
        lan_net = f"10.{n}.0"
        router = self._add_namespace(f"{self.tag}-{name}r")
        router.ip = wan_ip
        host = self._add_namespace(f"{self.tag}-{name}")
        host.ip = f"{lan_net}.2"
        self._attach_to_switch(router, "wan0", wan_ip)
        router.run("ip", "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host.name)
        router.run("ip", "addr", "add", f"{lan_net}.1/24", "dev", "lan0")
        router.run("ip", "link", "set", "lan0", "up")
        host.run("ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "route", "add", "default", "via", f"{lan_net}.1")
        self._configure_nat(router, nat)
        home = Home(name, nat, router, host, f"{lan_net}.1")
        self.homes[name] = home
        return home

    @staticmethod
    def _configure_nat(router: Namespace, nat: NatType) -> None:
        router.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        masq = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan0", "-j", "MASQUERADE"]
        if nat is NatType.SYMMETRIC:
            masq.append("--random-fully")
        router.run(*masq)
        router.run("iptables", "-P", "FORWARD", "DROP")
        router.run("iptables", "-A", "FORWARD", "-i", "lan0", "-o", "wan0", "-j", "ACCEPT")
        router.run(
            "iptables", "-A", "FORWARD", "-i", "wan0", "-o", "lan0",
            "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT",
        )  # fmt: skip
        # Unsolicited packets to the router itself are dropped silently, as home routers do. A
        # RST instead would also confirm a conntrack entry whose reply tuple then clashes with the
        # LAN host's own outbound flow to that peer, and the NAT would move it to another port.
        router.run(
            "iptables", "-A", "INPUT", "-i", "wan0",
            "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT",
        )  # fmt: skip
        router.run("iptables", "-A", "INPUT", "-i", "wan0", "-j", "DROP")

    def namespaces(self) -> list[str]:
        """Names of the namespaces this internet created (and will delete)."""
        return list(self._names)
