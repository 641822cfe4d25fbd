"""The tensor-parallel data plane over libp2p streams (``/potluck/tp-star/1``): the fallback path.

When a worker has no direct TCP path to the master's star (or the node is told to use libp2p),
it opens a ``/potluck/tp-star/1`` stream to the master over the existing Noise + Yamux connection
(relayed or hole-punched as the overlay arranged), sends :class:`TpStreamHello` (session, rank),
waits for :class:`TpStreamAck`, and from then on the stream carries the star's binary frames
(:mod:`potluck.sharding.collective.frames`): the master admits it with ``StarMaster.admit`` and the worker
authenticates with ``StarWorker.over``, exactly as over TCP (same HMAC handshake with the session
key that came inside the ``tp_join`` RPC).

:class:`Libp2pByteStream` is the blocking :class:`potluck.sharding.collective.channel.ByteStream` the star
needs: every ``send``/``recv_into`` crosses into the overlay's trio thread through
:meth:`TrioThread.run_blocking` with the call's deadline. It is used from the engine's compute
thread, never from the asyncio loop or the trio thread.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import anyio
from libp2p.exceptions import BaseLibp2pError

from potluck.errors import ClosedError, PeerRefused, PotluckError, ProtocolViolation, TransferError
from potluck.identity import PeerId
from potluck.overlay.admission import Admission
from potluck.overlay.bridge import TrioThread
from potluck.overlay.host import Libp2pHost
from potluck.overlay.wire import ErrorFrame, FrameStream, TpStreamAck, TpStreamHello

log = logging.getLogger(__name__)

STAR_PROTOCOL = "/potluck/tp-star/1"
HELLO_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 2.0
_MAX_HELLO_FRAME = 1024


class Libp2pByteStream:
    """A blocking :class:`~potluck.sharding.collective.channel.ByteStream` over a libp2p stream.

    Args:
        bridge: the overlay's trio thread (the stream lives there).
        stream: an open libp2p ``INetStream``.
        peer: the remote peer ID (for logs and errors).
        on_close: optional trio-side coroutine function run once when the stream is closed
            (the master's stream handler waits on it).

    Thread use: one thread at a time calls :meth:`send` / :meth:`recv_into`; :meth:`close` may come
    from any plain thread.
    """

    def __init__(
        self,
        bridge: TrioThread,
        stream: Any,
        peer: str,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._bridge = bridge
        self._stream = stream
        self.peer = f"libp2p:{peer[-8:]}"
        self._on_close = on_close
        self._closed = False

    def _run(self, fn: Callable[..., Awaitable[Any]], *args: Any, deadline: float, what: str) -> Any:
        if self._closed:
            raise ClosedError(f"stream to {self.peer} is closed")
        timeout = math.inf if deadline == math.inf else deadline - time.monotonic()
        if timeout <= 0:
            raise TransferError(f"deadline passed on the stream to {self.peer}")
        try:
            return self._bridge.run_blocking(fn, self._stream, *args, timeout)
        except ClosedError as exc:
            if self._closed:
                raise
            raise TransferError(f"{what} to/from {self.peer} failed: the overlay stopped") from exc
        except TransferError:
            if self._closed:
                raise ClosedError(f"stream to {self.peer} was closed during {what}") from None
            raise

    def send(self, buffers: Sequence[bytes | bytearray | memoryview], deadline: float) -> None:
        data = b"".join(buffers)
        if data:
            self._run(_write, data, deadline=deadline, what="send")

    def recv_into(self, buffers: Sequence[memoryview], deadline: float) -> int:
        want = sum(b.nbytes for b in buffers)
        data: bytes = self._run(_read, want, deadline=deadline, what="receive")
        got = len(data)
        at = 0
        for buf in buffers:
            if at >= got:
                break
            n = min(buf.nbytes, got - at)
            buf[:n] = data[at : at + n]
            at += n
        return got

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._bridge.run_blocking(_close, self._stream, self._on_close)
        except ClosedError:
            pass  # the overlay is gone, and the stream with it


async def _write(stream: Any, data: bytes, limit_s: float) -> None:
    try:
        with anyio.fail_after(limit_s):
            await stream.write(data)
    except TimeoutError as exc:
        raise TransferError(f"libp2p stream send timed out after {limit_s:.1f} s") from exc
    except (BaseLibp2pError, OSError, EOFError) as exc:
        raise TransferError(f"libp2p stream broke: {type(exc).__name__}: {exc}") from exc


async def _read(stream: Any, n: int, limit_s: float) -> bytes:
    """All ``n`` bytes (the star asks only for bytes its frame needs), in one thread crossing:
    a crossing costs ~100 µs, more than Yamux delivering the rest of a frame."""
    parts: list[bytes] = []
    got = 0
    try:
        with anyio.fail_after(limit_s):
            while got < n:
                data: bytes = await stream.read(n - got)
                if not data:
                    raise TransferError("the peer closed the libp2p stream")
                parts.append(data)
                got += len(data)
    except TimeoutError as exc:
        raise TransferError(f"libp2p stream receive timed out after {limit_s:.1f} s") from exc
    except (BaseLibp2pError, OSError, EOFError) as exc:
        raise TransferError(f"libp2p stream broke: {type(exc).__name__}: {exc}") from exc
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _close(stream: Any, on_close: Callable[[], Awaitable[None]] | None) -> None:
    with anyio.move_on_after(_CLOSE_TIMEOUT_S, shield=True):
        try:
            await stream.close()
        except (BaseLibp2pError, OSError) as exc:
            log.debug("closing a tp-star stream: %s", exc)
        try:
            await stream.reset()
        except (BaseLibp2pError, OSError) as exc:
            log.debug("resetting a tp-star stream: %s", exc)
    if on_close is not None:
        await on_close()


# ---------------------------------------------------------------------- worker side (trio)
async def open_star_stream(host: Libp2pHost, peer: PeerId, session: str, rank: int) -> Any:
    """(trio) Open ``/potluck/tp-star/1`` to the master ``peer`` and join ``session`` as ``rank``.

    Returns:
        The libp2p stream, ready for the star's binary frames (wrap it in
        :class:`Libp2pByteStream`).

    Raises:
        ConnectError: no stream could be opened.
        PeerRefused: the master does not know the session or refused us.
        TransferError / ProtocolViolation: the stream broke or the master sent garbage.
    """
    stream = await host.open_stream(peer, STAR_PROTOCOL, deadline_s=HELLO_TIMEOUT_S)
    frames = FrameStream(stream, max_frame=_MAX_HELLO_FRAME)
    try:
        with anyio.fail_after(HELLO_TIMEOUT_S):
            await frames.send(TpStreamHello(session=session, rank=rank))
            reply = await frames.recv()
    except TimeoutError as exc:
        await _close(stream, None)
        raise TransferError(f"master {peer} did not acknowledge the tp-star stream") from exc
    except PotluckError:
        await _close(stream, None)
        raise
    if isinstance(reply, ErrorFrame):
        await _close(stream, None)
        raise PeerRefused(f"master {peer} refused the tp-star stream: {reply.message}")
    if not isinstance(reply, TpStreamAck) or reply.session != session:
        await _close(stream, None)
        raise ProtocolViolation(f"master {peer} answered the tp-star hello with {type(reply).__name__}")
    return stream


def connect_star_stream(
    bridge: TrioThread, host: Libp2pHost, master: PeerId, session: str, rank: int
) -> Libp2pByteStream:
    """(plain worker thread) :func:`open_star_stream` through ``bridge``, wrapped for the star.

    Raises:
        as :func:`open_star_stream`; ClosedError: the overlay is shutting down.
    """
    stream = bridge.run_blocking(open_star_stream, host, master, session, rank)
    return Libp2pByteStream(bridge, stream, master)


# ---------------------------------------------------------------------- master side (trio)
class StarStreamApp(Protocol):
    """What the master's node does with an incoming tp-star stream (asyncio side)."""

    async def tp_accept_stream(self, peer: PeerId, session: str, rank: int, stream: Libp2pByteStream) -> None:
        """Hand ``stream`` to the group ``session`` waiting for ``peer`` as ``rank``.

        Raises:
            PeerRefused: no such session, or ``peer`` was not invited as that rank.
        """
        ...


class StarStreamServer:
    """Serves ``/potluck/tp-star/1`` in the trio thread: admission, hello, then hands the stream
    over and keeps it open until the star closes it.

    Args:
        bridge: crossing to the node's asyncio loop.
        admission: only admitted peers may open a data-plane stream.
        app: where streams go (``None``: this node runs no tensor-parallel groups).
    """

    def __init__(self, bridge: TrioThread, admission: Admission, app: Callable[[], StarStreamApp | None]) -> None:
        self.bridge = bridge
        self.admission = admission
        self.app = app

    def install(self, host: Libp2pHost) -> None:
        host.set_handler(STAR_PROTOCOL, self.handle)

    async def handle(self, stream: Any, peer: PeerId) -> None:
        """Serve one tp-star stream. Never raises for bad input (the host resets the stream)."""
        frames = FrameStream(stream, max_frame=_MAX_HELLO_FRAME)
        if not self.admission.is_admitted(peer):
            self.admission.refuse(peer, "not_admitted", "tp-star")
            await _send_error(frames, "refused", "not admitted to this swarm")
            return
        app = self.app()
        try:
            with anyio.fail_after(HELLO_TIMEOUT_S):
                hello = await frames.recv()
            if not isinstance(hello, TpStreamHello):
                raise ProtocolViolation(f"expected a tp_stream hello, got {type(hello).__name__}")
            if app is None:
                raise PeerRefused("this node runs no tensor-parallel group")
        except (ProtocolViolation, PeerRefused) as exc:
            log.info("tp-star stream from %s refused: %s", peer, exc)
            await _send_error(frames, "protocol" if isinstance(exc, ProtocolViolation) else "refused", str(exc))
            return
        except (TransferError, TimeoutError) as exc:
            log.debug("tp-star hello from %s never arrived: %s", peer, exc)
            return
        done = anyio.Event()

        async def closed() -> None:
            done.set()

        byte_stream = Libp2pByteStream(self.bridge, stream, peer, on_close=closed)
        try:
            await self.bridge.call_asyncio(app.tp_accept_stream, peer, hello.session, hello.rank, byte_stream)
        except PeerRefused as exc:
            log.info("tp-star stream from %s refused: %s", peer, exc)
            await _send_error(frames, "refused", str(exc))
            return
        try:
            with anyio.fail_after(HELLO_TIMEOUT_S):
                await frames.send(TpStreamAck(session=hello.session))
        except (TransferError, TimeoutError) as exc:
            log.info("tp-star ack to %s failed: %s", peer, exc)
        await done.wait()  # the stream belongs to the star until it closes it


async def _send_error(frames: FrameStream, code: Any, message: str) -> None:
    try:
        with anyio.fail_after(HELLO_TIMEOUT_S):
            await frames.send(ErrorFrame(code=code, message=message[:1024]))
    except (TransferError, ProtocolViolation, TimeoutError):
        pass
