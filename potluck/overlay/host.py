"""The node's libp2p host (py-libp2p 0.8): TCP, Noise, Yamux, the node's Ed25519 key as identity.

Everything here runs in the overlay's trio thread (see :mod:`potluck.overlay.bridge`); it uses
``anyio``, which drives trio natively, so this module never imports trio itself.

Only Noise is offered as a security transport: py-libp2p's default set also offers plaintext,
secio and TLS, and a plaintext fallback must not exist on a node that serves private prompts.
Listening on an unspecified address (``0.0.0.0``) announces every interface address instead.

py-libp2p opens its TCP listeners with ``SO_REUSEPORT`` (DCUtR dials out from the listen port),
so a second node on the same machine could bind the same port and the kernel would split
incoming connections between the two. :meth:`Libp2pHost.running` therefore checks first, with a
plain socket, whether the port is already taken; a taken port falls back to a free one, logged
with both ports and the ``--p2p-port`` flag (README, "Pool devices: the swarm").
Later transports (circuit relay v2, AutoNAT, DCUtR: issue 4) plug into :meth:`Libp2pHost.build`
and :meth:`Libp2pHost.running`.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import anyio
import ifaddr
import multiaddr
from anyio.streams.memory import MemoryObjectSendStream
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import InvalidAddrError, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from potluck.errors import ConfigError, ConnectError, PotluckError
from potluck.identity import NodeIdentity, PeerId

log = logging.getLogger(__name__)

StreamHandler = Callable[[INetStream, PeerId], Awaitable[None]]
_CONN_EVENTS = 256  # bounded queue of connect/disconnect events


def listen_multiaddr(host: str, port: int) -> multiaddr.Multiaddr:
    """``/ip4/<host>/tcp/<port>`` (or ``/ip6/...``).

    Raises:
        ConfigError: ``host`` is not an IP address.
    """
    proto = "ip6" if ":" in host else "ip4"
    try:
        return multiaddr.Multiaddr(f"/{proto}/{host}/tcp/{port}")
    except (ValueError, TypeError, BaseLibp2pError) as exc:
        raise ConfigError(f"p2p_host {host!r} is not an IP address: {exc}") from exc


def _tcp_endpoint(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    """``(ip, port)`` of an ``/ip4|ip6/<ip>/tcp/<port>`` listen address (``None`` otherwise)."""
    parts = str(addr).split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or not parts[4].isdigit():
        return None
    return parts[2], int(parts[4])


def port_in_use(host: str, port: int) -> bool:
    """True when another socket listens on ``host:port`` (any socket, with or without SO_REUSEPORT).

    A probe socket with ``SO_REUSEADDR`` but *without* ``SO_REUSEPORT`` cannot bind next to a
    listening socket on Linux, macOS and Windows, yet binds over leftover ``TIME_WAIT`` ones.
    Port 0 is never in use.
    """
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def parse_peer_multiaddr(addr: str) -> tuple[PeerId, multiaddr.Multiaddr]:
    """Split ``/ip4/.../tcp/.../p2p/<peer ID>`` into the peer ID and the full multiaddr.

    Raises:
        ConfigError: not a multiaddr, or it lacks the ``/p2p/<peer ID>`` part.
    """
    try:
        ma = multiaddr.Multiaddr(addr)
        info = info_from_p2p_addr(ma)
    except (ValueError, TypeError, InvalidAddrError, BaseLibp2pError) as exc:
        raise ConfigError(f"bad peer multiaddr {addr!r} (want /ip4/<ip>/tcp/<port>/p2p/<peer ID>): {exc}") from exc
    return PeerId(info.peer_id.to_base58()), ma


def _interface_ipv4() -> list[str]:
    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str) and ip.ip not in ips:
                ips.append(ip.ip)
    # Loopback last: py-libp2p's DCUtR binds hole-punch dials to the first listen address (issue 4).
    return sorted(ips, key=lambda ip: ip.startswith("127."))


def _expand_unspecified(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace ``/ip4/0.0.0.0/...`` by one address per interface (libp2p's ``AddrsFactory``)."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        text = str(addr)
        if text.startswith("/ip4/0.0.0.0/"):
            rest = text[len("/ip4/0.0.0.0") :]
            out.extend(multiaddr.Multiaddr(f"/ip4/{ip}{rest}") for ip in _interface_ipv4())
        elif text not in {str(a) for a in out}:
            out.append(addr)
    return out


class _ConnNotifee(INotifee):
    """Forwards connect/disconnect events into a bounded memory stream (never blocks the swarm)."""

    def __init__(self, send: MemoryObjectSendStream[tuple[str, PeerId]]) -> None:
        self._send = send

    def _put(self, kind: str, conn: INetConn) -> None:
        peer = PeerId(conn.muxed_conn.peer_id.to_base58())
        try:
            self._send.send_nowait((kind, peer))
        except anyio.WouldBlock:
            log.warning("connection event queue full; dropped %s of %s", kind, peer)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._put("connected", conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._put("disconnected", conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


class Libp2pHost:
    """A py-libp2p host speaking TCP + Noise + Yamux under the node's own key.

    Args:
        identity: the node's key; its peer ID becomes the libp2p peer ID.
        listen: multiaddrs to listen on.

    Raises:
        ConfigError: libp2p derived a different peer ID from the key than potluck did.
    """

    def __init__(self, identity: NodeIdentity, listen: Sequence[multiaddr.Multiaddr]) -> None:
        self.identity = identity
        self.listen = list(listen)
        key_pair = create_new_key_pair(identity.private_bytes_raw())
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self.host: IHost = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): cast(Any, Yamux)},
            listen_addrs=self.listen,
            addrs_factory=_expand_unspecified,
        )
        libp2p_id = self.host.get_id().to_base58()
        if libp2p_id != identity.peer_id:
            raise ConfigError(f"libp2p derived peer ID {libp2p_id}, potluck {identity.peer_id}")
        self.peer_id = identity.peer_id
        self._events_send, self.events = anyio.create_memory_object_stream[tuple[str, PeerId]](_CONN_EVENTS)
        # NAT traversal hooks (potluck.overlay.nat, issue 4): circuit addresses we announce, and a
        # dialer run before a stream opens to a peer we are not connected to (direct, then relay).
        self.extra_addrs: list[str] = []
        self.dial_hook: Callable[[PeerId], Awaitable[None]] | None = None
        self.host.get_network().register_notifee(_ConnNotifee(self._events_send))

    @asynccontextmanager
    async def running(self, fallback_to_free_port: bool = True) -> AsyncIterator[None]:
        """Listen until the block exits; the swarm, its listeners and connections close after it.

        py-libp2p 0.8 only logs a failed listen, and binds with ``SO_REUSEPORT`` next to another
        process listening on the same port; we check both. When the configured port is taken and
        ``fallback_to_free_port`` is set, listen on a free port of the same address instead (and
        log which one).

        Raises:
            ConfigError: nothing could listen, or the port is taken and there is no fallback.
        """
        taken = [ep for a in self.listen if (ep := _tcp_endpoint(a)) is not None and port_in_use(*ep)]
        if taken and not fallback_to_free_port:
            where = ", ".join(f"{h}:{p}" for h, p in taken)
            raise ConfigError(f"libp2p port {where} is already in use; pick another with --p2p-port")
        if taken:
            self.listen = [_free_port_variant(a) if _tcp_endpoint(a) in taken else a for a in self.listen]
        async with self.host.run(self.listen):
            if not self.host.get_transport_addrs() and fallback_to_free_port:
                free = [multiaddr.Multiaddr(str(a).rsplit("/tcp/", 1)[0] + "/tcp/0") for a in self.listen]
                log.warning("cannot listen on %s (port busy?); using a free port", ", ".join(map(str, self.listen)))
                await self.host.get_network().listen(*free)
            if not self.host.get_transport_addrs():
                raise ConfigError(f"libp2p cannot listen on {', '.join(map(str, self.listen))}")
            for host, port in taken:
                log.warning(
                    "libp2p port %s:%d is already in use (another node on this machine?); listening on "
                    "free port %s instead. Pass --p2p-port to choose one.",
                    host,
                    port,
                    ", ".join(str(p) for p in self.listen_ports()),
                )
            log.info("libp2p host %s listening on %s", self.peer_id, ", ".join(self.addrs()))
            try:
                yield
            finally:
                self._events_send.close()

    def listen_ports(self) -> list[int]:
        """The TCP ports the host actually listens on."""
        ports = {ep[1] for a in self.host.get_transport_addrs() if (ep := _tcp_endpoint(a)) is not None}
        return sorted(ports)

    def addrs(self) -> list[str]:
        """Announced multiaddrs, each ending in ``/p2p/<peer ID>``."""
        return [str(a) for a in self.host.get_addrs()] + self.extra_addrs

    def connected_peers(self) -> list[PeerId]:
        return [PeerId(p.to_base58()) for p in self.host.get_connected_peers()]

    def set_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``: ``handler(stream, remote_peer_id)``; the stream is closed after it.

        The remote peer ID is the one Noise authenticated. Errors the handler lets through are
        logged and the stream is reset; they never reach the swarm.
        """

        async def wrapped(stream: INetStream) -> None:
            peer = PeerId(stream.muxed_conn.peer_id.to_base58())
            try:
                await handler(stream, peer)
            except (PotluckError, BaseLibp2pError, OSError, TimeoutError) as exc:
                log.debug("%s handler for %s ended: %s", protocol, peer, exc)
                await _reset_quietly(stream)
                return
            await _close_quietly(stream)

        self.host.set_stream_handler(protocol, wrapped)  # type: ignore[arg-type]

    async def connect(self, addr: multiaddr.Multiaddr | str, deadline_s: float = 10.0) -> PeerId:
        """Dial a peer by its full multiaddr (with ``/p2p/<peer ID>``).

        Raises:
            ConfigError: the address lacks a peer ID.
            ConnectError: the dial failed or took longer than ``deadline_s`` seconds.
        """
        peer, ma = parse_peer_multiaddr(str(addr))
        if peer == self.peer_id:
            raise ConnectError("refusing to dial ourselves")
        try:
            with anyio.fail_after(deadline_s):
                await self.host.connect(info_from_p2p_addr(ma))
        except TimeoutError as exc:
            raise ConnectError(f"dialling {addr} timed out after {deadline_s} s") from exc
        except (BaseLibp2pError, OSError) as exc:
            raise ConnectError(f"dialling {addr} failed: {type(exc).__name__}: {exc}") from exc
        return peer

    async def open_stream(self, peer: PeerId, protocol: str, deadline_s: float = 10.0) -> INetStream:
        """Open a stream to a connected (or known) peer and negotiate ``protocol``.

        Raises:
            ConnectError: no connection could be made or the peer does not speak ``protocol``.
        """
        if self.dial_hook is not None:
            await self.dial_hook(peer)
        try:
            with anyio.fail_after(deadline_s):
                return await self.host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
        except TimeoutError as exc:
            raise ConnectError(f"opening {protocol} to {peer} timed out after {deadline_s} s") from exc
        except (BaseLibp2pError, OSError, ValueError) as exc:
            raise ConnectError(f"opening {protocol} to {peer} failed: {type(exc).__name__}: {exc}") from exc

    async def disconnect(self, peer: PeerId) -> None:
        try:
            await self.host.disconnect(ID.from_base58(peer))
        except (BaseLibp2pError, OSError) as exc:
            log.debug("disconnecting %s: %s", peer, exc)

    def add_addrs(self, peer: PeerId, addrs: Sequence[str], ttl: int = 600) -> None:
        """Remember addresses of ``peer`` in the peerstore (learned from its signed record)."""
        mas: list[Any] = []
        for a in addrs:
            try:
                mas.append(multiaddr.Multiaddr(a).decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}")))
            except (ValueError, TypeError, BaseLibp2pError):
                continue
        if mas:
            self.host.get_peerstore().add_addrs(ID.from_base58(peer), mas, ttl)


def _free_port_variant(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    return multiaddr.Multiaddr(str(addr).rsplit("/tcp/", 1)[0] + "/tcp/0")


async def _close_quietly(stream: INetStream) -> None:
    try:
        await stream.close()
    except (BaseLibp2pError, OSError):
        pass


async def _reset_quietly(stream: INetStream) -> None:
    try:
        await stream.reset()
    except (BaseLibp2pError, OSError):
        pass
