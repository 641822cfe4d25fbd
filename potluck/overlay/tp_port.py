"""What the overlay calls on the tensor-parallel side: the seam toward sharding, seen from here.

The overlay never imports sharding (``docs/LAYERS.md``). It serves RPC ``tp_join`` and
``/potluck/tp-star/1`` streams and hands them to whatever the node registered as
``OverlayService.tp``, an object with the two methods of :class:`TensorParallelPort`
(:class:`potluck.sharding.orchestration.remote.TensorParallelService` implements it structurally).
Join messages are opaque payloads here: the overlay bounds their size and admits the caller; the
tensor-parallel side owns their schema and validates them. The other direction, what sharding needs
of the swarm, is ``potluck.sharding.orchestration.ports.SwarmPort``
(:class:`potluck.overlay.tp_swarm.OverlaySwarmPort`).
"""

from __future__ import annotations

from typing import Protocol

from potluck.identity import PeerId
from potluck.overlay.tp_stream import Libp2pByteStream


class TensorParallelPort(Protocol):
    """The tensor-parallel service as the overlay sees it (called on the node's asyncio loop)."""

    async def join(self, peer: PeerId, request: bytes) -> bytes:
        """RPC ``tp_join`` from the admitted ``peer``: accept the work or refuse it.

        Args:
            peer: the master (authenticated by Noise, admitted to this swarm).
            request: the join request payload, at most ``wire.MAX_TP_PAYLOAD`` bytes, not validated yet.

        Returns:
            The reply payload (at most ``wire.MAX_TP_REPLY_PAYLOAD`` bytes).

        Raises:
            PeerRefused: this node does not take the work.
            ProtocolViolation: the payload fails the request schema.
        """
        ...

    async def accept_stream(self, peer: PeerId, session: str, rank: int, stream: Libp2pByteStream) -> None:
        """A worker's ``/potluck/tp-star/1`` stream: hand it to the group forming under ``session``.

        Args:
            peer: the worker (admitted).
            session: the group's session id from the stream's hello (32 hex digits, validated).
            rank: the rank the worker claims (1..255, validated).
            stream: the stream, ready for the star's binary frames; the group owns it from now on.

        Raises:
            PeerRefused: no such group is forming, or ``peer`` was not invited as ``rank``.
        """
        ...
