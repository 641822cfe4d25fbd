"""Data-plane connections arriving for a group that is forming (the master's side).

Workers reach the master's star over direct TCP (:func:`accept_loop`, in its own thread) or over
``/potluck/tp-star/1`` libp2p streams (the overlay hands them to
:meth:`~potluck.sharding.orchestration.remote.TensorParallelService.accept_stream`). Both land in
one :class:`PendingJoin`, where the forming thread takes them one at a time
(``StarMaster`` is driven by one thread).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading

from potluck.errors import PeerRefused
from potluck.sharding.collective.channel import FrameChannel, SocketStream, configure_socket

log = logging.getLogger(__name__)

#: How often the acceptor checks whether to stop, seconds.
POLL_S = 0.5


class PendingJoin:
    """A group waiting for its workers' data-plane connections (TCP or libp2p streams).

    Args:
        session: the group's session id (32 hex digits).
        peers: rank -> the peer ID invited as that rank.
    """

    def __init__(self, session: str, peers: dict[int, str]) -> None:
        self.session = session
        self.peers = peers
        self.channels: queue.Queue[FrameChannel] = queue.Queue(maxsize=4 * (len(peers) + 1))

    def offer_stream(self, peer: str, rank: int, channel: FrameChannel) -> None:
        """A libp2p stream from ``peer`` claiming ``rank``.

        Raises:
            PeerRefused: ``peer`` was not invited as ``rank``, or too many connections are waiting.
        """
        if self.peers.get(rank) != peer:
            raise PeerRefused(f"peer {peer} was not invited as rank {rank} of this group")
        self.offer(channel)

    def offer(self, channel: FrameChannel) -> None:
        """Queue a connection for admission (a TCP one is authenticated by the star's handshake).

        Raises:
            PeerRefused: too many connections are waiting.
        """
        try:
            self.channels.put_nowait(channel)
        except queue.Full as exc:
            raise PeerRefused("too many connections are waiting to join this group") from exc

    def close_leftovers(self) -> None:
        """Close every connection nobody admitted."""
        while True:
            try:
                self.channels.get_nowait().close()
            except queue.Empty:
                return


def accept_loop(listener: socket.socket, pending: PendingJoin, stop: threading.Event) -> None:
    """Accept workers' direct TCP connections and queue them for admission until ``stop``."""
    listener.settimeout(POLL_S)
    while not stop.is_set():
        try:
            sock, addr = listener.accept()
        except TimeoutError:
            continue
        except OSError as exc:
            log.debug("tp accept loop ends: %s", exc)
            return
        configure_socket(sock)
        channel = FrameChannel(SocketStream(sock, peer=f"{addr[0]}:{addr[1]}"))
        try:
            pending.offer(channel)
        except PeerRefused:
            channel.close()
