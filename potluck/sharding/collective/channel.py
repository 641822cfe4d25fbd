"""Byte streams and the frame channel on top of them.

Two layers, so another transport can slot in under the star logic and the shard transfer:

- :class:`ByteStream` is the transport seam: scatter-gather ``send`` and ``recv_into`` with an absolute
  deadline. :class:`SocketStream` implements it over a blocking TCP socket (TCP_NODELAY, ``sendmsg``,
  ``recvmsg_into``). A libp2p-stream implementation (through ``overlay/bridge.py``) is the planned
  fallback when no direct TCP path exists; it only has to provide these three methods.
- :class:`FrameChannel` sends and receives :mod:`potluck.sharding.collective.frames` frames over a stream, checks
  sequence numbers per direction and receives arrays straight into caller buffers (no copies).

Deadlines are absolute ``time.monotonic()`` values (``math.inf`` waits forever). A channel is used by
one thread at a time.

Errors: :class:`~potluck.errors.TransferError` when the peer closed, reset or stalled past the
deadline; :class:`~potluck.errors.ClosedError` after our own ``close()``;
:class:`~potluck.errors.ProtocolViolation` for a malformed frame or an unexpected kind/sequence/shape.
"""

from __future__ import annotations

import logging
import math
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import numpy as np

from potluck.errors import ClosedError, ProtocolViolation, TransferError
from potluck.sharding.collective import frames
from potluck.sharding.collective.frames import DType, Kind

__all__ = ["ArrayLane", "ByteStream", "Frame", "FrameChannel", "SocketStream", "configure_socket"]

log = logging.getLogger(__name__)

_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
_TIMEVAL = struct.Struct("@ll")  # struct timeval {tv_sec; tv_usec}
_REARM_SLACK_S = 0.05
_SEQ = struct.Struct("<Q")
_SEQ_OFFSET = 8  # of the sequence number in the frame prefix (see frames.PREFIX)
_UNKNOWN = -1.0  # kernel timeout state unknown: re-arm before the next call
_INF = math.inf
_monotonic = time.monotonic
# Any C-contiguous object with the buffer protocol: bytes, bytearray, memoryview, numpy array (numpy's
# stubs do not declare the buffer protocol, hence Any).
Buffer: TypeAlias = Any


class ByteStream(Protocol):
    """A reliable, ordered byte stream with deadlines (TCP socket, later a libp2p stream)."""

    def send(self, buffers: Sequence[bytes | bytearray | memoryview], deadline: float) -> None:
        """Send every byte of ``buffers`` in order (scatter-gather) before ``deadline``.

        Raises:
            TransferError: peer closed or reset, or the deadline passed.
            ClosedError: we closed the stream.
        """
        ...

    def recv_into(self, buffers: Sequence[memoryview], deadline: float) -> int:
        """Receive at least one byte into ``buffers`` (filled in order); return how many.

        Raises:
            TransferError: peer closed (end of stream), reset, or the deadline passed.
            ClosedError: we closed the stream.
        """
        ...

    def close(self) -> None:
        """Close; idempotent."""
        ...


def configure_socket(sock: socket.socket) -> None:
    """TCP_NODELAY, 4 MiB buffers (latency, not bandwidth, dominates the star) and a short TCP
    keepalive (probe after 5 s idle, every 2 s, 3 probes), so a peer whose host vanished without a
    FIN/RST is noticed in about 11 s even by a member waiting without a deadline."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; other platforms keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER_BYTES)


class SocketStream:
    """:class:`ByteStream` over a blocking socket. Takes ownership of ``sock``.

    Deadlines are enforced with kernel socket timeouts (``SO_RCVTIMEO`` / ``SO_SNDTIMEO``) on a
    blocking socket rather than ``settimeout``, which would cost an ``ioctl`` and a ``poll`` per call:
    the timeout is re-armed only when it would overshoot the deadline by more than 50 ms, and an early
    kernel timeout before the deadline just retries. One syscall per send or receive on the fast path.

    ``poll_s`` > 0: a receive first polls the socket without blocking for up to that many seconds
    before it sleeps in the kernel (spin-then-block, as MPI and NCCL wait for a peer): a process
    woken from a blocking ``recv`` pays the scheduler's wake-up latency on every all-reduce hop. Only
    worth its CPU where the rank has a core to itself (measured, 1.1B model, 2 ranks on 2 cores:
    all-reduce wait 6-7 -> 2-4.6 ms/token at 100 us; ``bench/tp_decode.py``).
    """

    def __init__(self, sock: socket.socket, *, peer: str = "", poll_s: float = 0.0) -> None:
        sock.settimeout(None)  # blocking; deadlines come from the kernel timeouts below
        self.poll_s = poll_s
        self._sock = sock
        self._closed = False
        # Armed kernel timeouts in seconds: 0.0 none, _UNKNOWN to re-arm.
        self._rcv_armed = _UNKNOWN
        self._snd_armed = _UNKNOWN
        self.peer = peer or _peer_name(sock)

    def _arm(self, option: int, armed: float, deadline: float) -> None:
        """Re-arm ``option`` if its kernel timeout is unknown, absent or would overshoot ``deadline``
        by more than the slack (the callers inline the common "nothing to do" case)."""
        if self._closed:
            raise ClosedError(f"stream to {self.peer} is closed")
        if deadline == math.inf:
            if armed != 0.0:
                self._set_timeout(option, 0.0)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError(f"deadline passed on the stream to {self.peer}")
        if armed <= 0.0 or armed > remaining + _REARM_SLACK_S:
            self._set_timeout(option, remaining)

    def _set_timeout(self, option: int, seconds: float) -> None:
        whole = int(seconds)
        micros = int((seconds - whole) * 1e6)
        if seconds and not (whole or micros):
            micros = 1  # 0 would mean "no timeout"
        self._sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, micros))
        if option == socket.SO_RCVTIMEO:
            self._rcv_armed = seconds
        else:
            self._snd_armed = seconds

    def _expired(self, exc: OSError, deadline: float) -> bool:
        """A kernel timeout: True if the deadline has passed, False to retry (timed out early)."""
        if not isinstance(exc, BlockingIOError) or time.monotonic() >= deadline:
            return True
        self._rcv_armed = self._snd_armed = _UNKNOWN  # re-arm precisely on the retry
        return False

    def _translate(self, exc: OSError, what: str) -> Exception:
        if self._closed:
            return ClosedError(f"stream to {self.peer} was closed during {what}")
        if isinstance(exc, (BlockingIOError, TimeoutError)):
            return TransferError(f"{what} to/from {self.peer} timed out")
        return TransferError(f"{what} to/from {self.peer} failed: {exc}")

    def send(self, buffers: Sequence[bytes | bytearray | memoryview], deadline: float) -> None:
        total = 0
        for buf in buffers:
            total += buf.nbytes if type(buf) is memoryview else len(buf)
        self.send_exact(buffers, total, deadline)

    def send_exact(self, buffers: Sequence[Buffer], total: int, deadline: float) -> None:
        """:meth:`send` of ``buffers`` (any C-contiguous buffers, numpy arrays included) holding
        ``total`` bytes, known to the caller: the all-reduce fast path, one ``sendmsg``."""
        # The deadline check is inlined: re-arm only when the armed kernel timeout is unknown or
        # could overshoot the deadline by more than the slack.
        armed = self._snd_armed
        if self._closed or deadline == _INF or not 0.0 < armed <= deadline - _monotonic() + _REARM_SLACK_S:
            self._arm(socket.SO_SNDTIMEO, armed, deadline)
        try:
            sent = self._sock.sendmsg(buffers)
        except OSError as exc:
            if self._expired(exc, deadline):
                raise self._translate(exc, "send") from exc
            sent = 0
        if sent != total:
            self._send_rest(buffers, sent, deadline)

    def _send_rest(self, buffers: Sequence[Buffer], sent: int, deadline: float) -> None:
        """The slow path of :meth:`send`: finish after a partial (or early timed-out) ``sendmsg``."""
        views = [_bytes_of(b) for b in buffers]
        while True:
            _consume(views, sent)
            if not views:
                return
            self._arm(socket.SO_SNDTIMEO, self._snd_armed, deadline)
            try:
                sent = self._sock.sendmsg(views)
            except OSError as exc:
                if self._expired(exc, deadline):
                    raise self._translate(exc, "send") from exc

    def recv_into(self, buffers: Sequence[memoryview], deadline: float) -> int:
        sock = self._sock
        if self.poll_s > 0.0 and not self._closed:
            n = self._poll_into(buffers)
            if n is not None:
                return n
        while True:
            armed = self._rcv_armed
            if self._closed or deadline == _INF or not 0.0 < armed <= deadline - _monotonic() + _REARM_SLACK_S:
                self._arm(socket.SO_RCVTIMEO, armed, deadline)
            try:
                n = sock.recv_into(buffers[0]) if len(buffers) == 1 else sock.recvmsg_into(buffers)[0]
                break
            except OSError as exc:
                if self._expired(exc, deadline):
                    raise self._translate(exc, "receive") from exc
        if n == 0:
            if self._closed:
                raise ClosedError(f"stream to {self.peer} is closed")
            raise TransferError(f"{self.peer} closed the connection")
        return n

    def _poll_into(self, buffers: Sequence[memoryview]) -> int | None:
        """Non-blocking receives for up to :attr:`poll_s`: the bytes received, or ``None`` when nothing
        came (or the socket failed or closed: the blocking receive then reports it)."""
        sock, end = self._sock, _monotonic() + self.poll_s
        while True:
            try:
                if len(buffers) == 1:
                    n = sock.recv_into(buffers[0], 0, socket.MSG_DONTWAIT)
                else:
                    n = sock.recvmsg_into(buffers, 0, socket.MSG_DONTWAIT)[0]
            except BlockingIOError:
                if _monotonic() >= end:
                    return None
                continue
            except OSError:
                return None
            return n or None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected: nothing left to shut down
        self._sock.close()


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes from the scatter/gather list ``views`` (in place)."""
    while n:
        first = views[0].nbytes
        if n >= first:
            n -= first
            views.pop(0)
        else:
            views[0] = views[0][n:]
            n = 0


def _bytes_of(buf: Buffer) -> memoryview:
    """A flat byte view of any C-contiguous buffer."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _peer_name(sock: socket.socket) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return "<unconnected>"
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name) or f"<{sock.family.name}>"


@dataclass(frozen=True, slots=True)
class Frame:
    """A received frame: kind, decoded control header, optional array (owns its memory)."""

    kind: Kind
    header: dict[str, Any]
    array: np.ndarray | None


class FrameChannel:
    """Sequenced frames over a :class:`ByteStream`.

    Args:
        stream: the transport; the channel owns it.
        max_frame_bytes: largest frame accepted or sent (prefix + header + payload).
    """

    def __init__(self, stream: ByteStream, *, max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.stream = stream
        self.max_frame_bytes = max_frame_bytes
        self._send_seq = 0
        self._recv_seq = 0
        self._prefix = bytearray(frames.PREFIX.size)
        self._prefix_view = memoryview(self._prefix)

    @property
    def peer(self) -> str:
        return str(getattr(self.stream, "peer", "?"))

    # -- sending -------------------------------------------------------------------------------------

    def send(
        self,
        kind: Kind,
        header: dict[str, Any] | None = None,
        array: np.ndarray | None = None,
        *,
        deadline: float,
    ) -> None:
        """Send one frame. ``array`` must be a :func:`frames.wire_array` (or None).

        Raises:
            ProtocolViolation: header/array not framable or frame too large (nothing was sent).
            TransferError, ClosedError: see :class:`ByteStream`.
        """
        self.send_packed(kind, frames.pack_header(header), array, deadline=deadline)

    def send_packed(self, kind: Kind, packed: bytes, array: np.ndarray | None, *, deadline: float) -> None:
        """:meth:`send` with a header already packed by :func:`frames.pack_header`."""
        head, payload = frames.encode_packed(kind, self._send_seq, packed, array, max_frame_bytes=self.max_frame_bytes)
        self._send_seq += 1
        self.stream.send((head,) if payload is None else (head, payload), deadline)

    # -- receiving -----------------------------------------------------------------------------------

    def _fill(self, views: list[memoryview], deadline: float) -> None:
        while views:
            _consume(views, self.stream.recv_into(views, deadline))

    def _prefix_ok(
        self, max_frame_bytes: int | None, raw: bytes | bytearray | memoryview | None = None
    ) -> frames.Prefix:
        """Decode and check the prefix in ``raw`` (default: the channel's prefix buffer), count it."""
        prefix = frames.decode_prefix(
            self._prefix if raw is None else raw, max_frame_bytes=max_frame_bytes or self.max_frame_bytes
        )
        if prefix.seq != self._recv_seq:
            raise ProtocolViolation(f"sequence number {prefix.seq} from {self.peer}, expected {self._recv_seq}")
        self._recv_seq += 1
        if prefix.kind is Kind.CLOSE:
            raise TransferError(f"{self.peer} closed the channel")
        return prefix

    def recv(self, *, deadline: float, max_frame_bytes: int | None = None) -> Frame:
        """Receive the next frame of any kind; the array (if any) is a fresh, owned numpy array.

        Args:
            deadline: absolute monotonic deadline.
            max_frame_bytes: a tighter size limit for this frame (e.g. during the handshake).

        Raises:
            ProtocolViolation: malformed frame or wrong sequence number.
            TransferError: the peer sent CLOSE, closed, reset or stalled past the deadline.
        """
        self._fill([self._prefix_view], deadline)
        prefix = self._prefix_ok(max_frame_bytes)
        header_buf = bytearray(prefix.header_len)
        array = None
        views = [memoryview(header_buf)] if prefix.header_len else []
        if prefix.dtype is not DType.NONE:
            array = np.empty(prefix.shape, dtype=prefix.np_dtype)
            if prefix.payload_len:
                views.append(frames.byte_view(array))
        self._fill(views, deadline)
        return Frame(prefix.kind, frames.decode_header(header_buf), array)

    def close(self) -> None:
        self.stream.close()


class ArrayLane:
    """The all-reduce hot path over one :class:`FrameChannel`: header-less frames of one fixed dtype and
    shape, sent as ``send_kind`` and received as ``recv_kind`` (PARTIAL and REDUCED).

    Both 40-byte prefixes are packed once; per frame only the sequence number is patched in. A send is
    one ``sendmsg`` of prefix + array bytes. A receive is one ``recv_into`` of the whole frame into a
    preallocated buffer (or a scatter read into a caller's array), validated with one bytes comparison
    against the expected prefix; only a mismatch is decoded field by field, to say what was wrong.
    Sequence numbers are the channel's own, so lanes and other frames interleave freely.

    Args:
        channel: the channel; the lane shares its sequence numbers and stream.
        send_kind, recv_kind: frame kinds of the two directions.
        dtype: float32 or float16 (the wire dtype).
        shape: the array shape (at most :data:`frames.MAX_NDIM` dimensions).

    Raises:
        ProtocolViolation: dtype or shape not framable, or a frame larger than the channel's limit.
    """

    def __init__(self, channel: FrameChannel, send_kind: Kind, recv_kind: Kind, dtype: Any, shape: tuple[int, ...]):
        self.channel = channel
        self._socket_stream = channel.stream if isinstance(channel.stream, SocketStream) else None
        self.dtype = np.dtype(dtype)
        self.shape = shape
        probe = np.empty(shape, self.dtype)  # validates dtype, layout and size through the encoder
        self._send_head = bytearray(
            frames.encode_packed(send_kind, 0, b"", probe, max_frame_bytes=channel.max_frame_bytes)[0]
        )
        self._want = bytearray(frames.encode_packed(recv_kind, 0, b"", probe)[0])
        self.recv_kind = recv_kind
        self.size = frames.PREFIX.size + probe.nbytes  # bytes per frame
        self._frame = bytearray(self.size)
        self._whole = [memoryview(self._frame)]
        self._prefix_view = self._whole[0][: frames.PREFIX.size]
        # (shape): the payload of the last received frame, a view into the lane's buffer
        self.received: np.ndarray = np.frombuffer(self._frame, self.dtype, probe.size, frames.PREFIX.size).reshape(
            shape
        )

    def send(self, payload: np.ndarray | memoryview, deadline: float) -> None:
        """Send one frame carrying ``payload``: a C-contiguous array of the lane's dtype and shape, or a
        byte view of one (the caller guarantees it; the star checks its inputs).

        Raises:
            TransferError, ClosedError: see :class:`ByteStream`.
        """
        channel = self.channel
        head = self._send_head
        _SEQ.pack_into(head, _SEQ_OFFSET, channel._send_seq)
        channel._send_seq += 1
        if self._socket_stream is not None:
            self._socket_stream.send_exact((head, payload), self.size, deadline)
        else:
            channel.stream.send((head, _bytes_of(payload)), deadline)

    def recv(self, deadline: float) -> np.ndarray:
        """Receive the next frame into the lane's buffer; returns :attr:`received` (a view: valid until
        the next :meth:`recv` on this lane).

        Raises:
            ProtocolViolation: another kind, dtype, shape, sequence number or a non-empty header, raised as
                soon as the prefix has arrived (a mismatch never waits for the deadline).
            TransferError: the peer sent CLOSE, closed, reset or stalled past the deadline.
            ClosedError: we closed the channel.
        """
        channel = self.channel
        got = channel.stream.recv_into(self._whole, deadline)
        want = self._want
        _SEQ.pack_into(want, _SEQ_OFFSET, channel._recv_seq)
        if got == self.size and self._frame.startswith(want):
            channel._recv_seq += 1
            return self.received
        self._finish([self._whole[0]], got, deadline)
        return self.received

    def recv_into(self, out: np.ndarray, deadline: float) -> None:
        """Receive the next frame's array straight into ``out`` (C-contiguous, the lane's dtype and
        shape; e.g. a fresh array to return to a caller): one scatter read of prefix + payload.

        Raises:
            As :meth:`recv`.
        """
        channel = self.channel
        views = [self._prefix_view, out.data.cast("B")]
        got = channel.stream.recv_into(views, deadline)
        want = self._want
        _SEQ.pack_into(want, _SEQ_OFFSET, channel._recv_seq)
        if got == self.size and self._frame.startswith(want):
            channel._recv_seq += 1
            return
        self._finish(views, got, deadline)

    def _finish(self, views: list[memoryview], got: int, deadline: float) -> None:
        """Slow path of a receive: check the prefix as soon as it is complete, then read the rest."""
        need = frames.PREFIX.size
        checked = False
        while True:
            _consume(views, got)
            if not checked:
                need -= got
                if need <= 0:
                    self._check_prefix()
                    checked = True
            if not views:
                return
            got = self.channel.stream.recv_into(views, deadline)

    def _check_prefix(self) -> None:
        """Accept the received prefix or raise naming what differs from the expected one."""
        channel = self.channel
        raw = self._frame[: frames.PREFIX.size]
        if raw == self._want:
            channel._recv_seq += 1
            return
        prefix = channel._prefix_ok(None, raw)
        if prefix.kind is not self.recv_kind:
            raise ProtocolViolation(f"{channel.peer} sent a {prefix.kind.name} frame, expected {self.recv_kind.name}")
        raise ProtocolViolation(
            f"{channel.peer} sent {prefix.kind.name} with dtype {prefix.dtype.name}, shape {prefix.shape}, "
            f"header {prefix.header_len} bytes; expected {self.dtype}, {self.shape}, no header"
        )
