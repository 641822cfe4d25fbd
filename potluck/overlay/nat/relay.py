"""Circuit relay v2 (libp2p circuit-v2 spec): relay limits and the reservations of an unreachable node.

* A node started with ``--relay`` serves the hop protocol with the spec's limits: how many
  reservations it holds (``relay_max_reservations``) and for how long (``relay_reservation_ttl_s``),
  how many circuits run at once (``relay_max_circuits``), and per circuit a duration and a byte
  budget (``relay_circuit_duration_s``, ``relay_circuit_bytes``); past them the relay ends the circuit.
* A node that AutoNAT does not judge public keeps reservations on ``nat_relays`` relays
  (:class:`Reservations`). A reservation lives only while the connection to its relay does: when
  that connection is lost the reservation is dropped and the next round reserves on another relay.
  Reservations are refreshed before they expire. Each one yields a circuit address
  ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<us>`` that the node advertises.

Relayed connections are end-to-end encrypted: the relay forwards the raw bytes of a stream, and
the two peers run Noise over it (py-libp2p upgrades a circuit like any raw connection), so the relay
sees only ciphertext.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import anyio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport

from potluck.config import Settings
from potluck.identity import PeerId

log = logging.getLogger(__name__)

RESERVE_TIMEOUT_S = 10.0
REFRESH_MARGIN_S = 60.0  # refresh a reservation this long before it expires
RETRY_AFTER_S = 30.0  # a relay that refused us is not asked again before this


def relay_limits(settings: Settings) -> RelayLimits:
    """The relay v2 limits of a ``--relay`` node (spec: reservation and circuit ``Limit``)."""
    return RelayLimits(
        duration=settings.relay_circuit_duration_s,
        data=settings.relay_circuit_bytes,
        max_circuit_conns=settings.relay_max_circuits,
        max_reservations=settings.relay_max_reservations,
        reservation_ttl=settings.relay_reservation_ttl_s,
    )


@dataclass(frozen=True)
class Reservation:
    """A slot held on a relay; ``expires`` in Unix seconds."""

    relay: PeerId
    relay_addr: str  # the relay's transport address we reached it at, e.g. /ip4/198.18.0.2/tcp/4001
    expires: float

    def circuit_addr(self, me: PeerId) -> str:
        return f"{self.relay_addr}/p2p/{self.relay}/p2p-circuit/p2p/{me}"


class Reservations:
    """The reservations of one node (trio thread).

    Args:
        host: the py-libp2p host.
        transport: the circuit v2 transport (it performs the RESERVE exchange).
        want: how many relays to hold reservations on.
    """

    def __init__(self, host: Any, transport: CircuitV2Transport, want: int) -> None:
        self.host = host
        self.transport = transport
        self.want = want
        self.held: dict[PeerId, Reservation] = {}
        self._refused: dict[PeerId, float] = {}

    def circuit_addrs(self, me: PeerId) -> list[str]:
        return [r.circuit_addr(me) for r in sorted(self.held.values(), key=lambda r: r.relay)]

    def candidates(self) -> list[PeerId]:
        """Peers on a direct connection that announced the hop protocol (identify), sorted."""
        network = self.host.get_network()
        store = self.host.get_peerstore()
        out = []
        for pid, conns in list(network.connections.items()):
            if not _direct_addr(conns):
                continue
            try:
                if not store.supports_protocols(pid, [HOP_PROTOCOL_ID]):
                    continue
            except (BaseLibp2pError, KeyError, ValueError):
                continue
            out.append(PeerId(pid.to_base58()))
        return sorted(out)

    async def maintain(self, active: bool) -> bool:
        """One round: drop lost reservations, refresh old ones, add new ones while ``active``.

        Args:
            active: whether this node needs reservations (not publicly reachable).

        Returns:
            whether the set of circuit addresses changed.
        """
        before = set(self.held)
        network = self.host.get_network()
        for relay in list(self.held):
            if not active or not _direct_addr(network.connections.get(ID.from_base58(relay))):
                log.info("relay reservation on %s dropped (%s)", relay, "reachable" if not active else "relay lost")
                del self.held[relay]
        now = time.time()
        for relay, res in list(self.held.items()):
            if res.expires - now < REFRESH_MARGIN_S:
                await self._reserve(relay)
        if active:
            for relay in self.candidates():
                if len(self.held) >= self.want:
                    break
                if relay in self.held or self._refused.get(relay, 0.0) > time.monotonic():
                    continue
                await self._reserve(relay)
        return set(self.held) != before

    async def _reserve(self, relay: PeerId) -> None:
        pid = ID.from_base58(relay)
        addr = _direct_addr(self.host.get_network().connections.get(pid))
        if addr is None:
            return
        stream = None
        ok = False
        try:
            with anyio.fail_after(RESERVE_TIMEOUT_S):
                stream = await self.host.new_stream(pid, [HOP_PROTOCOL_ID])
                ok = await self.transport._make_reservation(stream, pid)
        except (TimeoutError, BaseLibp2pError, OSError, ValueError) as exc:
            log.info("reservation on relay %s failed: %s", relay, exc)
        finally:
            if stream is not None:
                try:
                    await stream.close()
                except (BaseLibp2pError, OSError):
                    pass
        if not ok:
            self._refused[relay] = time.monotonic() + RETRY_AFTER_S
            self.held.pop(relay, None)
            return
        expires = float(self.transport._reservations.get(pid) or time.time() + 3600)
        self.held[relay] = Reservation(relay, addr, expires)
        log.info("reserved a slot on relay %s (%s), %.0f s", relay, addr, expires - time.time())


def _direct_addr(conns: Any) -> str | None:
    """The remote transport address of the first direct (non-circuit) connection, without /p2p."""
    if not conns:
        return None
    if not isinstance(conns, list):
        conns = [conns]
    for conn in conns:
        try:
            addrs = [str(a) for a in conn.get_transport_addresses()]
        except (AttributeError, RuntimeError, ValueError):
            continue
        for addr in addrs:
            if "/p2p-circuit" not in addr and "/tcp/" in addr:
                return addr.split("/p2p/", 1)[0]
    return None
