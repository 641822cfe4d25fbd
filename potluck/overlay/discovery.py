"""Finding peers: bootstrap multiaddrs, zeroconf on the LAN, and the DHT for models.

* **Bootstrap** (``--bootstrap``, repeatable): each address is dialled, admitted and synced; a
  lost bootstrap connection is re-dialled with capped exponential backoff (:mod:`potluck.retry`).
* **LAN**: a zeroconf (mDNS/DNS-SD, RFC 6762/6763) service ``_potluck._tcp.local.`` whose TXT
  record carries ``peer_id``, ``swarm`` and the multiaddrs (``a0``, ``a1``, ...). Peers of the same
  swarm found by browsing are dialled automatically. py-libp2p's own mDNS discovery is not used:
  it advertises no swarm name, so every potluck node on a LAN would be dialled.
* **DHT**: every served model is announced as a provider record ``/potluck/model/<id>``, and our
  signed state record is stored under ``/potluck/peer/<peer ID>``; see :mod:`potluck.overlay.dht`.
  :meth:`Discovery.find_model` looks providers up again when a request names a model that no
  peer in the cluster state serves (:class:`potluck.overlay.peer_routes.PeerRouteProvider`).

Discovery knows nothing of the overlay service: the service hands it a :class:`DiscoveryHooks`
(a few callables), and the DHT as :class:`DhtOps` (asyncio-side calls that cross the bridge).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from libp2p.peer.id import ID
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from potluck.config import Settings
from potluck.errors import ConfigError, NetworkError
from potluck.identity import PeerId
from potluck.overlay.bridge import TrioThread
from potluck.overlay.dht import model_key, peer_key
from potluck.overlay.host import parse_peer_multiaddr
from potluck.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)

SERVICE_TYPE = "_potluck._tcp.local."
BOOTSTRAP_CHECK_S = 5.0
# Re-dialling a lost bootstrap peer: 1 s, 2 s, 4 s ... at most 30 s apart, for as long as it takes.
BOOTSTRAP_RETRY = RetryPolicy(Backoff(first_s=1.0, max_s=30.0), retry_on=(NetworkError, TimeoutError))
DHT_REPROVIDE_S = 60.0
_MAX_TXT_ADDRS = 8
_MAX_PROVIDERS = 8


@dataclass(frozen=True)
class DhtOps:
    """The DHT as discovery uses it (asyncio side; each call crosses into the trio thread).

    Raises (every call): NetworkError when the bridge or the DHT fails.
    """

    add_peer: Callable[[PeerId], Awaitable[None]]
    provide: Callable[[str], Awaitable[object]]  # a provider key (:func:`model_key`)
    put_value: Callable[[str, bytes], Awaitable[None]]
    find_providers: Callable[[str, int], Awaitable[list[tuple[PeerId, list[str]]]]]  # (peer, multiaddrs)


def bridged_dht(bridge: TrioThread, dht: Any) -> DhtOps:
    """:class:`DhtOps` over a running py-libp2p ``KadDHT`` in ``bridge``'s trio thread."""
    return DhtOps(
        add_peer=lambda peer: bridge.call(_add_to_routing_table, dht, peer),
        provide=lambda key: bridge.call(dht.provide, key),
        put_value=lambda key, value: bridge.call(dht.put_value, key, value),
        find_providers=lambda key, count: bridge.call(_find_providers, dht, key, count),
    )


@dataclass(frozen=True)
class DiscoveryHooks:
    """What discovery needs from the overlay service (the service builds it).

    Attributes:
        peer_id: this node.
        addrs: this node's announced multiaddrs.
        start_task: run a background coroutine owned by the service.
        connect: dial a full multiaddr, run admission and a first state sync (raises
            ConfigError, NetworkError, TimeoutError).
        is_admitted: the peer passed admission on a live connection.
        is_connected: the peer has a live libp2p connection.
        has_peers: any live libp2p connection at all.
        own_record: our signed state record as raw bytes, or ``None`` before the first one.
        model_ids: the models this node serves now.
        dht: the DHT, or ``None`` when it is disabled.
    """

    peer_id: PeerId
    addrs: Callable[[], list[str]]
    start_task: Callable[[Coroutine[Any, Any, None], str], None]
    connect: Callable[[str], Awaitable[PeerId]]
    is_admitted: Callable[[PeerId], bool]
    is_connected: Callable[[PeerId], bool]
    has_peers: Callable[[], bool]
    own_record: Callable[[], bytes | None]
    model_ids: Callable[[], list[str]]
    dht: DhtOps | None = None


class Discovery:
    """Bootstrap, zeroconf and DHT announcements of one overlay service (async context manager).

    Args:
        hooks: what discovery needs from the service.
        settings: the node's settings (``bootstrap``, ``lan_discovery``, ``swarm``).

    Raises:
        ConfigError: a ``--bootstrap`` address is not a peer multiaddr.
    """

    def __init__(self, hooks: DiscoveryHooks, settings: Settings) -> None:
        self.hooks = hooks
        self.settings = settings
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._found: asyncio.Queue[str] = asyncio.Queue(256)
        for addr in self.settings.bootstrap:
            parse_peer_multiaddr(addr)  # ConfigError early for a bad --bootstrap

    async def __aenter__(self) -> Discovery:
        for addr in self.settings.bootstrap:
            self.hooks.start_task(self._keep_connected(addr), f"bootstrap {addr}")
        if self.settings.lan_discovery:
            await self._start_zeroconf()
            self.hooks.start_task(self._dial_found(), "zeroconf-dial")
        if self.hooks.dht is not None:
            self.hooks.start_task(self._announce_dht(), "dht-announce")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_zeroconf()

    # ------------------------------------------------------------------ bootstrap
    async def _keep_connected(self, addr: str) -> None:
        peer, _ = parse_peer_multiaddr(addr)
        while True:
            if self.hooks.is_admitted(peer) and self.hooks.is_connected(peer):
                await asyncio.sleep(BOOTSTRAP_CHECK_S)
                continue
            async for attempt in BOOTSTRAP_RETRY.async_retrying(log, f"bootstrap {addr}", level=logging.WARNING):
                with attempt:
                    if not (self.hooks.is_admitted(peer) and self.hooks.is_connected(peer)):
                        await self.hooks.connect(addr)
            await self._dht_add(peer)
            log.info("joined the swarm through bootstrap peer %s", peer)

    async def _dht_add(self, peer: PeerId) -> None:
        dht = self.hooks.dht
        if dht is None:
            return
        try:
            await dht.add_peer(peer)
        except NetworkError as exc:
            log.debug("could not add %s to the DHT routing table: %s", peer, exc)

    # ------------------------------------------------------------------ zeroconf
    async def _start_zeroconf(self) -> None:
        me, own_addrs = self.hooks.peer_id, self.hooks.addrs()
        addrs = [a for a in own_addrs if "/ip4/" in a and "/ip4/127." not in a] or own_addrs
        ips = sorted({a.split("/")[2] for a in addrs if a.startswith("/ip4/")})
        port = next((int(a.split("/tcp/")[1].split("/")[0]) for a in addrs if "/tcp/" in a), 0)
        props: dict[str, str] = {"peer_id": me, "swarm": self.settings.swarm, "v": "1"}
        props.update({f"a{i}": a for i, a in enumerate(addrs[:_MAX_TXT_ADDRS])})
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{me}.{SERVICE_TYPE}",
            addresses=[_ip_bytes(ip) for ip in ips],
            port=port,
            properties=props,
            server=f"{me[-16:].lower()}.local.",
        )
        self._zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        try:
            await self._zc.async_register_service(self._info, allow_name_change=True)
            self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        except BaseException:
            await self._stop_zeroconf()
            raise
        log.info("zeroconf: advertising %s on %s", SERVICE_TYPE, ", ".join(ips))

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            try:
                self._found.put_nowait(name)
            except asyncio.QueueFull:
                log.debug("zeroconf queue full; %s waits for its next announcement", name)

    async def _dial_found(self) -> None:
        assert self._zc is not None
        while True:
            name = await self._found.get()
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(self._zc.zeroconf, 3000):
                continue
            props = {
                k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()
            }
            peer, swarm = props.get("peer_id", ""), props.get("swarm", "")
            if peer == self.hooks.peer_id:
                continue
            if swarm != self.settings.swarm:
                log.debug("zeroconf: ignoring %s of swarm %r", peer, swarm)
                continue
            if self.hooks.is_admitted(PeerId(peer)):
                continue
            addrs = [v for k, v in sorted(props.items()) if k.startswith("a") and k[1:].isdigit()]
            await self._dial_any(PeerId(peer), addrs)

    async def _dial_any(self, peer: PeerId, addrs: list[str], how: str = "zeroconf") -> None:
        for addr in addrs:
            try:
                if parse_peer_multiaddr(addr)[0] != peer:
                    log.warning("%s: %s advertises an address of another peer: %s", how, peer, addr)
                    continue
                await self.hooks.connect(addr)
                await self._dht_add(peer)
                log.info("%s: joined peer %s at %s", how, peer, addr)
                return
            except (ConfigError, NetworkError, TimeoutError) as exc:
                log.info("%s: dialling %s at %s failed: %s", how, peer, addr, exc)

    async def _stop_zeroconf(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._info is not None:
            await zc.async_unregister_service(self._info)
        await zc.async_close()

    # ------------------------------------------------------------------ DHT
    async def _announce_dht(self) -> None:
        hooks, dht = self.hooks, self.hooks.dht
        assert dht is not None
        while True:
            if hooks.has_peers():
                for model in hooks.model_ids():
                    try:
                        await dht.provide(model_key(model))
                    except NetworkError as exc:
                        log.info("DHT provide of %s failed: %s", model, exc)
                own = hooks.own_record()
                if own is not None:
                    try:
                        await dht.put_value(peer_key(hooks.peer_id), own)
                    except (NetworkError, ValueError) as exc:
                        log.info("DHT put of our record failed: %s", exc)
                await asyncio.sleep(DHT_REPROVIDE_S)
            else:
                await asyncio.sleep(BOOTSTRAP_CHECK_S)

    async def find_model(self, model: str) -> list[PeerId]:
        """Providers of ``model`` found in the DHT, dialled, admitted and synced.

        Callers bound the time it takes (each dial has its own deadline, the DHT walk has none).

        Returns:
            The providers admitted now (their signed records are in the cluster state); empty
            when the DHT is off or nobody else provides the model.

        Raises:
            NetworkError: the DHT lookup itself failed.
        """
        dht = self.hooks.dht
        if dht is None:
            return []
        found: list[PeerId] = []
        for peer, addrs in await dht.find_providers(model_key(model), _MAX_PROVIDERS):
            if peer == self.hooks.peer_id:
                continue
            full = [a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in addrs]
            await self._dial_any(peer, full, "DHT")
            if self.hooks.is_admitted(peer):
                found.append(peer)
        return found


async def _add_to_routing_table(dht: Any, peer: PeerId) -> None:
    await dht.add_peer(ID.from_base58(peer))


async def _find_providers(dht: Any, key: str, count: int) -> list[tuple[PeerId, list[str]]]:
    """(trio) ``dht.find_providers`` as plain data: (peer ID, multiaddrs) per provider."""
    infos = await dht.find_providers(key, count)
    return [(PeerId(info.peer_id.to_base58()), [str(a) for a in info.addrs]) for info in infos]


def _ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed
