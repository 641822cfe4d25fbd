"""The swarm as tensor parallelism needs it, over a running :class:`OverlayService`.

:class:`OverlaySwarmPort` implements ``potluck.sharding.orchestration.ports.SwarmPort`` structurally
(no sharding import here; the node wires the two): candidate workers from the signed cluster state
and our link measurements, failure exclusion, the ``tp_join`` RPC with its opaque payloads, and the
``/potluck/tp-star/1`` data-plane stream (the libp2p fallback of the star).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from potluck.identity import PeerId
from potluck.overlay import rpc
from potluck.overlay.service import OverlayService
from potluck.overlay.state import Hardware
from potluck.overlay.tp_stream import Libp2pByteStream, connect_star_stream
from potluck.overlay.wire import TpJoinFrame


@dataclass(frozen=True)
class TpPeer:
    """A peer that could be a worker (``SwarmPort``'s ``PeerView``).

    Attributes:
        peer_id: its libp2p peer ID.
        ram_free: free RAM it advertises, bytes.
        decode_tps: decode tokens/s it measured on its own model (0: unknown).
        cores: CPU cores it advertises.
        rtt_s: our measured round trip to it, seconds (``None``: not measured yet).
        memory_budget: resident bytes it gives a tensor-parallel rank (0: not set).
        memory_bw, disk_bw: its measured weight-streaming and disk bandwidth, bytes/s (0: unknown).
    """

    peer_id: PeerId
    ram_free: int
    decode_tps: float
    cores: int
    rtt_s: float | None
    memory_budget: int = 0
    memory_bw: float = 0.0
    disk_bw: float = 0.0

    @classmethod
    def of(cls, peer: PeerId, hw: Hardware, rtt_s: float | None) -> TpPeer:
        return cls(peer, hw.ram_free, hw.decode_tps, hw.cores, rtt_s, hw.memory_budget, hw.memory_bw, hw.disk_bw)


class OverlaySwarmPort:
    """``SwarmPort`` over ``overlay`` (see ``potluck.sharding.orchestration.ports`` for the contract
    and which thread calls what).

    Args:
        overlay: the node's overlay service; used once it has started.
    """

    def __init__(self, overlay: OverlayService) -> None:
        self._overlay = overlay

    @property
    def peer_id(self) -> PeerId:
        return self._overlay.peer_id

    def local_peer(self) -> TpPeer:
        return TpPeer.of(self._overlay.peer_id, self._overlay.local.hardware(), 0.0)

    def listen_ips(self) -> list[str]:
        ips: list[str] = []
        for addr in self._overlay.addrs:
            parts = addr.split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and "p2p-circuit" not in parts and parts[2] not in ips:
                ips.append(parts[2])
        return ips

    async def candidates(self) -> list[TpPeer]:
        overlay = self._overlay
        out = []
        for signed in overlay.state.records():
            peer = signed.peer_id
            if peer == overlay.peer_id or overlay.is_excluded(peer):
                continue  # a peer we are not connected to is dialled and admitted before tp_join
            link = overlay.links.get(peer)
            out.append(TpPeer.of(peer, signed.record.hardware, link.rtt_s if link else None))
        return out

    def record_failure(self, peer: PeerId) -> None:
        self._overlay.record_failure(peer)

    async def invite(self, peer: PeerId, request: bytes, timeout_s: float) -> bytes:
        overlay = self._overlay
        await asyncio.wait_for(overlay.bridge.call(overlay.ensure_admitted, peer), timeout_s)
        frame = TpJoinFrame(payload=request)
        reply = await asyncio.wait_for(overlay.bridge.call(rpc.tp_join, overlay.p2p, peer, frame), timeout_s)
        return reply.payload

    def open_star_stream(self, master: PeerId, session: str, rank: int) -> Libp2pByteStream:
        overlay = self._overlay
        assert overlay.p2p is not None, "the overlay has not started"
        return connect_star_stream(overlay.bridge, overlay.p2p, master, session, rank)
