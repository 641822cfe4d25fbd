"""NAT traversal of one node: AutoNAT, relay reservations, relayed dialing, DCUtR, path visibility.

:class:`NatTraversal` runs in the overlay's trio thread for the lifetime of the libp2p host:

1. **Reachability** (:mod:`.autonat`): shortly after the first connections and then every
   ``nat_check_interval_s``, peers on direct connections are asked to dial us back.
2. **Reservations** (:mod:`.relay`): unless the node is judged public, it holds reservations on
   ``nat_relays`` relays (peers that announce the hop protocol), re-reserving on another relay
   within ``RESERVE_ROUND_S`` when one is lost. Its circuit addresses are added to the addresses
   it announces (signed cluster-state record, and through it the DHT record), and ``on_addrs_changed``
   republishes the record at once.
3. **Dialing** (:meth:`NatTraversal.ensure_connected`, the host's dial hook): a peer we are not
   connected to is dialled at its direct addresses first, then through each relay it advertises.
4. **Hole punching**: py-libp2p's DCUtR service upgrades every relayed connection to a direct
   one where the NATs allow it (TCP simultaneous open from the listen port) and closes the relayed
   leg after a grace period; where they do not (symmetric NAT), traffic stays on the relay.
5. **Visibility** (:mod:`.paths`): :attr:`NatTraversal.snapshot` holds, per peer, how its
   connections run; it is refreshed every ``OBSERVE_S`` and read from the asyncio side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from potluck.config import Settings
from potluck.errors import ConnectError
from potluck.identity import PeerId
from potluck.overlay.host import Libp2pHost
from potluck.overlay.nat.autonat import DialBackAutoNAT
from potluck.overlay.nat.paths import Path, best, classify
from potluck.overlay.nat.relay import Reservations, relay_limits
from potluck.retry import Backoff, RetryPolicy

log = logging.getLogger(__name__)

OBSERVE_S = 0.5
RESERVE_ROUND_S = 2.0
FIRST_CHECK_S = 2.0
DIRECT_DIAL_S = 5.0
RELAY_DIAL_S = 15.0
PUNCH_RETRY_S = 5.0  # between our own DCUtR retries toward a peer still only reachable through a relay
PUNCH_TRIES = 3  # DCUtR spec: up to 3 attempts (libp2p/specs relay/DCUtR.md, "retry")
#: After a round of PUNCH_TRIES failed attempts, the next round toward the same still-relayed peer
#: waits this long, doubling per failed round up to PUNCH_COOLDOWN_MAX_S: a punch that failed
#: because a host was busy (the simultaneous dials missed each other) or a mapping was cold can
#: succeed later, while a peer behind a symmetric NAT costs a few packets every 10 minutes.
PUNCH_COOLDOWN_S = 30.0
PUNCH_COOLDOWN_MAX_S = 600.0


def punch_due(spent: tuple[int, float] | None, now: float) -> bool:
    """Whether a round of hole-punch attempts toward a relayed-only peer may start.

    Args:
        spent: ``(failed rounds, time.monotonic() of the last)`` for the peer, ``None`` if none failed.
        now: ``time.monotonic()``.

    Returns:
        True when no round failed yet, or the last one failed at least ``PUNCH_COOLDOWN_S *
        2**(rounds - 1)`` seconds ago (at most :data:`PUNCH_COOLDOWN_MAX_S`).
    """
    if spent is None:
        return True
    rounds, last = spent
    return now - last >= min(PUNCH_COOLDOWN_S * 2 ** (rounds - 1), PUNCH_COOLDOWN_MAX_S)


class _StillRelayed(Exception):
    """A DCUtR attempt ended without a direct connection."""


PUNCH_RETRY = RetryPolicy(
    Backoff(first_s=PUNCH_RETRY_S, max_s=PUNCH_RETRY_S, factor=1.0),
    attempts=PUNCH_TRIES,
    retry_on=(_StillRelayed, BaseLibp2pError, OSError, TimeoutError),
)


class NatTraversal:
    """See the module docstring.

    Args:
        p2p: the node's libp2p host (its ``dial_hook`` and ``extra_addrs`` are set here).
        settings: ``relay``, ``relay_*`` limits, ``nat_relays``, ``hole_punching``,
            ``autonat_confirmations``, ``nat_check_interval_s``.
    """

    def __init__(self, p2p: Libp2pHost, settings: Settings) -> None:
        self.p2p = p2p
        self.settings = settings
        host = p2p.host
        limits = relay_limits(settings)
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=settings.relay)
        # STOP only: the transport must not reserve a slot on every relay it merely dials through.
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP, limits=limits))
        self.dcutr = DCUtRProtocol(host) if settings.hole_punching else None
        self.autonat = DialBackAutoNAT(host, settings.autonat_confirmations)
        self.reservations = Reservations(host, self.transport, settings.nat_relays)
        self.reachability = "unknown"
        self.snapshot: dict[PeerId, list[Path]] = {}
        self.on_addrs_changed: Callable[[], Awaitable[None]] | None = None
        self._relayed_seen: set[PeerId] = set()
        self._punched: set[PeerId] = set()
        self._punching: set[PeerId] = set()  # a punch task runs for these
        # tried PUNCH_TRIES times and still relayed only: peer -> (failed rounds, monotonic time of the last)
        self._punch_spent: dict[PeerId, tuple[int, float]] = {}
        p2p.dial_hook = self.ensure_connected

    # ------------------------------------------------------------------ lifecycle
    @asynccontextmanager
    async def running(self) -> AsyncIterator[NatTraversal]:
        """Run the relay protocol, DCUtR and the loops until the block exits."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(self.protocol))
            if self.dcutr is not None:
                await stack.enter_async_context(background_trio_service(self.dcutr))
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._observe)
                if self.dcutr is not None:
                    tg.start_soon(self._punch_retry_loop, self.dcutr)
                tg.start_soon(self._reserve_loop)
                tg.start_soon(self._reachability_loop)
                log.info("NAT traversal up (relay %s, hole punching %s)", self.settings.relay, self.dcutr is not None)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()

    # ------------------------------------------------------------------ dialing
    async def ensure_connected(self, peer: PeerId) -> None:
        """Make sure a connection to ``peer`` exists: direct addresses first, then its relays.

        Raises:
            ConnectError: no address worked.
        """
        host = self.p2p.host
        pid = ID.from_base58(peer)
        if host.get_network().connections.get(pid) or peer == self.p2p.peer_id:
            return
        addrs = [a for a in host.get_peerstore().addrs(pid)]
        direct = [a for a in addrs if "/p2p-circuit" not in str(a)]
        circuits = [a for a in addrs if "/p2p-circuit" in str(a)]
        errors: list[str] = []
        if direct:
            try:
                with anyio.fail_after(DIRECT_DIAL_S):
                    await host.connect(PeerInfo(pid, direct))
                return
            except (TimeoutError, BaseLibp2pError, OSError) as exc:
                errors.append(f"direct: {type(exc).__name__}: {exc}")
        for circuit in circuits:
            full = Multiaddr(f"{circuit}/p2p/{peer}") if not str(circuit).endswith(peer) else circuit
            try:
                with anyio.fail_after(RELAY_DIAL_S):
                    await self.transport.dial(full)
                self._relayed_seen.add(peer)
                log.info("connected to %s through relay (%s)", peer, full)
                return
            except (TimeoutError, BaseLibp2pError, OSError, ConnectionError, ValueError) as exc:
                errors.append(f"{full}: {type(exc).__name__}: {exc}")
        raise ConnectError(f"cannot reach {peer}: " + ("; ".join(errors) or "no known address"))

    # ------------------------------------------------------------------ loops
    async def _observe(self) -> None:
        network = self.p2p.host.get_network()
        me = self.p2p.peer_id
        while True:
            snapshot: dict[PeerId, list[Path]] = {}
            for pid, conns in list(network.connections.items()):
                peer = PeerId(pid.to_base58())
                conns = conns if isinstance(conns, list) else [conns]
                paths = [classify(c, False, me) for c in conns]
                if any(p.kind == "relayed" for p in paths):
                    self._relayed_seen.add(peer)
                elif peer in self._relayed_seen and paths:
                    self._punched.add(peer)
                if peer in self._punched:
                    paths = [classify(c, True, me) for c in conns]
                snapshot[peer] = paths
            for gone in (self._relayed_seen | self._punched) - set(snapshot):
                self._relayed_seen.discard(gone)
                self._punched.discard(gone)
            self.snapshot = snapshot
            await anyio.sleep(OBSERVE_S)

    async def _punch_retry_loop(self, dcutr: DCUtRProtocol) -> None:
        """Retry DCUtR toward peers still reached only through a relay.

        py-libp2p 0.8.1 drives one attempt per relayed connection on its own, but after a failed
        first attempt (seen here: the DCUtR stream negotiation over the circuit failing) it may not
        try again; the spec allows up to three attempts, so we make the remaining ones.

        Each such peer gets rounds of up to ``PUNCH_TRIES`` attempts about ``PUNCH_RETRY_S`` apart
        (:data:`PUNCH_RETRY`), in a task of its own, while it stays reached only through a relay; after
        a failed round the next waits :data:`PUNCH_COOLDOWN_S`, doubling up to
        :data:`PUNCH_COOLDOWN_MAX_S`. A peer that gets a direct path, or goes, starts afresh.
        """
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.sleep(PUNCH_RETRY_S)
                now = time.monotonic()
                for peer in list(self._punch_spent):  # gone peers start afresh
                    if peer not in self.snapshot:
                        del self._punch_spent[peer]
                for peer in list(self.snapshot):
                    if not self._relayed_only(peer):
                        self._punch_spent.pop(peer, None)
                    elif peer not in self._punching and punch_due(self._punch_spent.get(peer), now):
                        self._punching.add(peer)
                        tg.start_soon(self._punch, dcutr, peer)

    def _relayed_only(self, peer: PeerId) -> bool:
        paths = self.snapshot.get(peer) or []
        return bool(paths) and all(p.kind == "relayed" for p in paths)

    async def _punch(self, dcutr: DCUtRProtocol, peer: PeerId) -> None:
        """Our DCUtR attempts toward ``peer`` (see :meth:`_punch_retry_loop`)."""
        try:
            async for attempt in PUNCH_RETRY.async_retrying(log, f"hole punch to {peer}", sleep=anyio.sleep):
                with attempt:
                    if not self._relayed_only(peer):
                        return
                    ok = await dcutr.initiate_hole_punch(ID.from_base58(peer))
                    tries = attempt.retry_state.attempt_number
                    log.info("hole punch retry %d to %s: %s", tries, peer, "direct" if ok else "still relayed")
                    if not ok:
                        raise _StillRelayed("no direct connection")
        except PUNCH_RETRY.retry_on as exc:
            rounds = self._punch_spent.get(peer, (0, 0.0))[0] + 1
            log.info("hole punch to %s: no direct path after %d tries (%s); round %d", peer, PUNCH_TRIES, exc, rounds)
            self._punch_spent[peer] = (rounds, time.monotonic())
        finally:
            self._punching.discard(peer)

    async def _reserve_loop(self) -> None:
        while True:
            active = self.reachability != "public" and not self.settings.relay
            if await self.reservations.maintain(active):
                self.p2p.extra_addrs = self.reservations.circuit_addrs(self.p2p.peer_id)
                log.info("advertised relay addresses: %s", ", ".join(self.p2p.extra_addrs) or "none")
                if self.on_addrs_changed is not None:
                    await self.on_addrs_changed()
            await anyio.sleep(RESERVE_ROUND_S)

    async def _reachability_loop(self) -> None:
        await anyio.sleep(FIRST_CHECK_S)
        while True:
            servers = [
                ID.from_base58(p) for p, paths in self.snapshot.items() if any(x.kind != "relayed" for x in paths)
            ]
            if servers:
                status = await self.autonat.check(servers)
                if status != self.reachability:
                    log.info("AutoNAT: this node is %s (%d servers asked)", status, len(servers))
                self.reachability = status
                await anyio.sleep(self.settings.nat_check_interval_s)
            else:
                await anyio.sleep(FIRST_CHECK_S)

    # ------------------------------------------------------------------ visibility
    def connection(self, peer: str) -> dict[str, Any] | None:
        """How we are connected to ``peer`` (any thread): the path new streams take, and all paths."""
        paths = self.snapshot.get(PeerId(peer))
        chosen = best(paths or [])
        if chosen is None:
            return None
        return {**chosen.as_dict(), "paths": [p.as_dict() for p in paths or []]}

    def status(self) -> dict[str, Any]:
        """Reachability, reserved relays and our circuit addresses (JSON-ready, any thread)."""
        return {
            "reachability": self.reachability,
            "relay_service": self.settings.relay,
            "relays": sorted(self.reservations.held),
            "relayed_addrs": list(self.p2p.extra_addrs),
        }
