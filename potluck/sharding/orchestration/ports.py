"""What tensor parallelism needs of the swarm: the seam between sharding and the overlay.

Sharding never imports the overlay (``docs/LAYERS.md``). It asks the swarm for what it needs
through :class:`SwarmPort`; the overlay implements the protocol structurally
(:class:`potluck.overlay.tp_swarm.OverlaySwarmPort`) and the node wires the two. The other direction,
what the overlay calls on the tensor-parallel side, is :class:`potluck.overlay.tp_port.TensorParallelPort`,
which :class:`~potluck.sharding.orchestration.remote.TensorParallelService` implements.

Join messages cross the seam as msgpack bytes of :mod:`potluck.sharding.orchestration.messages`
models; the data plane crosses it as a blocking
:class:`~potluck.sharding.collective.channel.ByteStream`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from potluck.identity import PeerId
from potluck.sharding.collective.channel import ByteStream


class PeerView(Protocol):
    """A peer as the signed cluster state and our link measurements describe it."""

    @property
    def peer_id(self) -> PeerId:
        """Its libp2p peer ID."""
        ...

    @property
    def ram_free(self) -> int:
        """Free RAM it advertises, bytes."""
        ...

    @property
    def decode_tps(self) -> float:
        """Decode tokens/s it measured on its own model (0: unknown)."""
        ...

    @property
    def cores(self) -> int:
        """CPU cores it advertises."""
        ...

    @property
    def rtt_s(self) -> float | None:
        """Our measured round trip to it, seconds (``None``: not measured yet)."""
        ...

    @property
    def memory_budget(self) -> int:
        """Resident bytes it gives a tensor-parallel rank (0: not set)."""
        ...

    @property
    def memory_bw(self) -> float:
        """Its measured weight-streaming bandwidth, bytes/s (0: unknown)."""
        ...

    @property
    def disk_bw(self) -> float:
        """Its measured cold disk-read bandwidth, bytes/s (0: unknown)."""
        ...


class SwarmPort(Protocol):
    """The swarm as a tensor-parallel group sees it.

    Thread use: :meth:`candidates`, :meth:`record_failure` and :meth:`invite` run on the node's
    asyncio loop; :meth:`open_star_stream` blocks and is called from a plain worker thread (never
    the loop); the rest may be called from any thread.
    """

    @property
    def peer_id(self) -> PeerId:
        """This node's peer ID."""
        ...

    def local_peer(self) -> PeerView:
        """This node as it describes itself in its own record (RTT 0)."""
        ...

    def listen_ips(self) -> list[str]:
        """IP addresses this node listens on directly (relayed addresses left out)."""
        ...

    async def candidates(self) -> Sequence[PeerView]:
        """(loop) Live peers of this swarm that could be workers: every record but our own, less
        the peers excluded for recent failures. A peer we are not connected to yet is dialled and
        admitted by :meth:`invite`."""
        ...

    def record_failure(self, peer: PeerId) -> None:
        """(loop) Exclude ``peer`` for a while (the overlay's capped backoff)."""
        ...

    async def invite(self, peer: PeerId, request: bytes, timeout_s: float) -> bytes:
        """(loop) Send RPC ``tp_join`` (``request``: an encoded
        :class:`~potluck.sharding.orchestration.messages.TpJoinRequest`) to ``peer`` after admission,
        each step within ``timeout_s``.

        Returns:
            The peer's reply payload (an encoded ``TpJoinReply``, not validated yet).

        Raises:
            PeerRefused: the peer declined (setting, memory, busy) or refused admission.
            ConnectError / TransferError / ProtocolViolation: it could not be reached or broke.
            TimeoutError: a step took longer than ``timeout_s``.
        """
        ...

    def open_star_stream(self, master: PeerId, session: str, rank: int) -> ByteStream:
        """(worker thread) Open a ``/potluck/tp-star/1`` stream to ``master`` for ``session`` as
        ``rank`` and return it, acknowledged and ready for the star's binary frames.

        Raises:
            ConnectError: no stream could be opened.
            PeerRefused: the master does not know the session or refused us.
            TransferError / ProtocolViolation: the stream broke or the master sent garbage.
            ClosedError: the overlay is shutting down.
        """
        ...
