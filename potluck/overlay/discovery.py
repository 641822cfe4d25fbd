"""Finding peers: bootstrap multiaddrs, zeroconf on the LAN, and the DHT for models.

* **Bootstrap** (``--bootstrap``, repeatable): each address is dialled, admitted and synced; a
  lost bootstrap connection is re-dialled with capped exponential backoff.
* **LAN**: a zeroconf (mDNS/DNS-SD, RFC 6762/6763) service ``_potluck._tcp.local.`` whose TXT
  record carries ``peer_id``, ``swarm`` and the multiaddrs (``a0``, ``a1``, ...). Peers of the same
  swarm found by browsing are dialled automatically. py-libp2p's own mDNS discovery is not used:
  it advertises no swarm name, so every potluck node on a LAN would be dialled.
* **DHT**: every served model is announced as a provider record ``/potluck/model/<id>``, and our
  signed state record is stored under ``/potluck/peer/<peer ID>``; see :mod:`potluck.overlay.dht`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from libp2p.peer.id import ID
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from potluck.errors import ConfigError, NetworkError
from potluck.identity import PeerId
from potluck.overlay.dht import model_key, peer_key
from potluck.overlay.host import parse_peer_multiaddr

if TYPE_CHECKING:
    from potluck.overlay.service import OverlayService

log = logging.getLogger(__name__)

SERVICE_TYPE = "_potluck._tcp.local."
BOOTSTRAP_CHECK_S = 5.0
DHT_REPROVIDE_S = 60.0
_MAX_TXT_ADDRS = 8


class Discovery:
    """Bootstrap, zeroconf and DHT announcements of one overlay service (async context manager)."""

    def __init__(self, service: OverlayService) -> None:
        self.service = service
        self.settings = service.settings
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._found: asyncio.Queue[str] = asyncio.Queue(256)
        for addr in self.settings.bootstrap:
            parse_peer_multiaddr(addr)  # ConfigError early for a bad --bootstrap

    async def __aenter__(self) -> Discovery:
        for addr in self.settings.bootstrap:
            self.service.start_task(self._keep_connected(addr), f"bootstrap {addr}")
        if self.settings.lan_discovery:
            await self._start_zeroconf()
            self.service.start_task(self._dial_found(), "zeroconf-dial")
        if self.service.dht is not None:
            self.service.start_task(self._announce_dht(), "dht-announce")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_zeroconf()

    # ------------------------------------------------------------------ bootstrap
    async def _keep_connected(self, addr: str) -> None:
        peer, _ = parse_peer_multiaddr(addr)
        failures = 0
        while True:
            p2p = self.service.p2p
            if p2p is not None and peer in self.service.admission.admitted and peer in p2p.connected_peers():
                failures = 0
                await asyncio.sleep(BOOTSTRAP_CHECK_S)
                continue
            try:
                await self.service.connect(addr)
                await self._dht_add(peer)
                log.info("joined the swarm through bootstrap peer %s", peer)
                failures = 0
            except (NetworkError, TimeoutError) as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2**failures)
                log.warning("bootstrap %s failed (%s); retrying in %.0f s", addr, exc, delay)
                await asyncio.sleep(delay)

    async def _dht_add(self, peer: PeerId) -> None:
        dht = self.service.dht
        if dht is None:
            return
        try:
            await self.service.bridge.call(_add_to_routing_table, dht, peer)
        except NetworkError as exc:
            log.debug("could not add %s to the DHT routing table: %s", peer, exc)

    # ------------------------------------------------------------------ zeroconf
    async def _start_zeroconf(self) -> None:
        service = self.service
        addrs = [a for a in service.addrs if "/ip4/" in a and "/ip4/127." not in a] or service.addrs
        ips = sorted({a.split("/")[2] for a in addrs if a.startswith("/ip4/")})
        port = next((int(a.split("/tcp/")[1].split("/")[0]) for a in addrs if "/tcp/" in a), 0)
        props: dict[str, str] = {"peer_id": service.peer_id, "swarm": self.settings.swarm, "v": "1"}
        props.update({f"a{i}": a for i, a in enumerate(addrs[:_MAX_TXT_ADDRS])})
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{service.peer_id}.{SERVICE_TYPE}",
            addresses=[_ip_bytes(ip) for ip in ips],
            port=port,
            properties=props,
            server=f"{service.peer_id[-16:].lower()}.local.",
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
            if peer == self.service.peer_id:
                continue
            if swarm != self.settings.swarm:
                log.debug("zeroconf: ignoring %s of swarm %r", peer, swarm)
                continue
            if peer in self.service.admission.admitted:
                continue
            addrs = [v for k, v in sorted(props.items()) if k.startswith("a") and k[1:].isdigit()]
            await self._dial_any(PeerId(peer), addrs)

    async def _dial_any(self, peer: PeerId, addrs: list[str]) -> None:
        for addr in addrs:
            try:
                if parse_peer_multiaddr(addr)[0] != peer:
                    log.warning("zeroconf: %s advertises an address of another peer: %s", peer, addr)
                    continue
                await self.service.connect(addr)
                await self._dht_add(peer)
                log.info("zeroconf: joined peer %s at %s", peer, addr)
                return
            except (ConfigError, NetworkError, TimeoutError) as exc:
                log.info("zeroconf: dialling %s at %s failed: %s", peer, addr, exc)

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
        service = self.service
        while True:
            if service.p2p is not None and service.p2p.connected_peers():
                for ad in service.local.model_ads():
                    try:
                        await service.bridge.call(service.dht.provide, model_key(ad.id))
                    except NetworkError as exc:
                        log.info("DHT provide of %s failed: %s", ad.id, exc)
                own = service.state.get(service.peer_id)
                if own is not None:
                    try:
                        await service.bridge.call(service.dht.put_value, peer_key(service.peer_id), own.raw)
                    except (NetworkError, ValueError) as exc:
                        log.info("DHT put of our record failed: %s", exc)
                await asyncio.sleep(DHT_REPROVIDE_S)
            else:
                await asyncio.sleep(BOOTSTRAP_CHECK_S)

    async def find_model(self, model: str) -> list[PeerId]:
        """Providers of ``model`` found in the DHT (they are dialled and synced as a side effect)."""
        service = self.service
        if service.dht is None:
            return []
        infos = await service.bridge.call(service.dht.find_providers, model_key(model), 8)
        found: list[PeerId] = []
        for info in infos:
            peer = PeerId(info.peer_id.to_base58())
            if peer == service.peer_id:
                continue
            addrs = [f"{a}/p2p/{peer}" for a in info.addrs if "/p2p/" not in str(a)]
            await self._dial_any(peer, addrs)
            if peer in service.admission.admitted:
                found.append(peer)
        return found


async def _add_to_routing_table(dht: Any, peer: PeerId) -> None:
    await dht.add_peer(ID.from_base58(peer))


def _ip_bytes(ip: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(ip).packed
