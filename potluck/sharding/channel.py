"""Byte streams and the frame channel on top of them.

Two layers, so another transport can slot in under the star logic and the shard transfer:

- :class:`ByteStream` is the transport seam: scatter-gather ``send`` and ``recv_into`` with an absolute
  deadline. :class:`SocketStream` implements it over a blocking TCP socket (TCP_NODELAY, ``sendmsg``,
  ``recvmsg_into``). A libp2p-stream implementation (through ``overlay/bridge.py``) is the planned
  fallback when no direct TCP path exists; it only has to provide these three methods.
- :class:`FrameChannel` sends and receives :mod:`potluck.sharding.frames` frames over a stream, checks
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
from typing import Any, Protocol

import numpy as np

from potluck.errors import ClosedError, ProtocolViolation, TransferError
from potluck.sharding import frames
from potluck.sharding.frames import DType, Kind

__all__ = ["ByteStream", "Frame", "FrameChannel", "SocketStream", "configure_socket"]

log = logging.getLogger(__name__)

_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
_TIMEVAL = struct.Struct("@ll")  # struct timeval {tv_sec; tv_usec}
_REARM_SLACK_S = 0.05
_SEQ = struct.Struct("<Q")
_SEQ_OFFSET = 8  # of the sequence number in the frame prefix (see frames.PREFIX)
_MAX_TEMPLATES = 64
_UNKNOWN = -1.0  # kernel timeout state unknown: re-arm before the next call


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
    """

    def __init__(self, sock: socket.socket, *, peer: str = "") -> None:
        sock.settimeout(None)  # blocking; deadlines come from the kernel timeouts below
        self._sock = sock
        self._closed = False
        # Armed kernel timeouts in seconds: 0.0 none, _UNKNOWN to re-arm.
        self._armed = {socket.SO_RCVTIMEO: _UNKNOWN, socket.SO_SNDTIMEO: _UNKNOWN}
        self.peer = peer or _peer_name(sock)

    def _arm(self, option: int, deadline: float) -> None:
        if self._closed:
            raise ClosedError(f"stream to {self.peer} is closed")
        armed = self._armed[option]
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
        self._armed[option] = seconds

    def _expired(self, exc: OSError, deadline: float) -> bool:
        """A kernel timeout: True if the deadline has passed, False to retry (timed out early)."""
        if not isinstance(exc, BlockingIOError) or time.monotonic() >= deadline:
            return True
        self._armed = dict.fromkeys(self._armed, _UNKNOWN)  # re-arm precisely on the retry
        return False

    def _translate(self, exc: OSError, what: str) -> Exception:
        if self._closed:
            return ClosedError(f"stream to {self.peer} was closed during {what}")
        if isinstance(exc, (BlockingIOError, TimeoutError)):
            return TransferError(f"{what} to/from {self.peer} timed out")
        return TransferError(f"{what} to/from {self.peer} failed: {exc}")

    def send(self, buffers: Sequence[bytes | bytearray | memoryview], deadline: float) -> None:
        views = [memoryview(b) for b in buffers]
        total = sum(v.nbytes for v in views)
        while total:
            self._arm(socket.SO_SNDTIMEO, deadline)
            try:
                sent = self._sock.sendmsg(views)
            except OSError as exc:
                if not self._expired(exc, deadline):
                    continue
                raise self._translate(exc, "send") from exc
            total -= sent
            while sent:
                n = views[0].nbytes
                if sent >= n:
                    sent -= n
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def recv_into(self, buffers: Sequence[memoryview], deadline: float) -> int:
        while True:
            self._arm(socket.SO_RCVTIMEO, deadline)
            try:
                n = self._sock.recvmsg_into(buffers)[0]
                break
            except OSError as exc:
                if not self._expired(exc, deadline):
                    continue
                raise self._translate(exc, "receive") from exc
        if n == 0:
            if self._closed:
                raise ClosedError(f"stream to {self.peer} is closed")
            raise TransferError(f"{self.peer} closed the connection")
        return n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already disconnected: nothing left to shut down
        self._sock.close()


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
        self._templates: dict[tuple[Any, ...], bytearray] = {}  # prefixes of header-less array frames

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

    def send_array(self, kind: Kind, array: np.ndarray, *, deadline: float, payload: memoryview | None = None) -> None:
        """Fast path of :meth:`send` for a header-less frame of a :func:`frames.wire_array` (the
        all-reduce): the prefix is validated once per (kind, dtype, shape), then only its sequence
        number is patched in, and prefix + array go out in one ``sendmsg``.

        Args:
            payload: optional ready byte view of ``array`` (saves making one per receiver).
        """
        key = (True, kind, array.dtype.char, array.shape)
        head = self._templates.get(key)
        if head is None:
            head = bytearray(frames.encode_packed(kind, 0, b"", array, max_frame_bytes=self.max_frame_bytes)[0])
            self._remember(key, head)
        _SEQ.pack_into(head, _SEQ_OFFSET, self._send_seq)
        self._send_seq += 1
        if payload is None:
            payload = frames.byte_view(array)
        self.stream.send((head, payload), deadline)

    def _remember(self, key: tuple[Any, ...], template: bytearray) -> None:
        if len(self._templates) >= _MAX_TEMPLATES:
            self._templates.clear()
        self._templates[key] = template

    # -- receiving -----------------------------------------------------------------------------------

    def _fill(self, views: list[memoryview], deadline: float) -> None:
        while views:
            got = self.stream.recv_into(views, deadline)
            while got:
                n = views[0].nbytes
                if got >= n:
                    got -= n
                    views.pop(0)
                else:
                    views[0] = views[0][got:]
                    got = 0

    def _prefix_ok(self, max_frame_bytes: int | None) -> frames.Prefix:
        prefix = frames.decode_prefix(self._prefix, max_frame_bytes=max_frame_bytes or self.max_frame_bytes)
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

    def recv_array_into(
        self, kind: Kind, out: np.ndarray, *, deadline: float, payload: memoryview | None = None
    ) -> None:
        """Receive a frame of ``kind`` with an empty header whose array has exactly ``out``'s dtype and
        shape, straight into ``out`` (one scatter read of prefix + payload, no copy). ``payload`` is
        an optional ready byte view of ``out`` (for reused buffers).

        Raises:
            ProtocolViolation: another kind, dtype, shape or a non-empty header (checked as soon as the
                prefix has arrived, so a mismatch never waits for the deadline).
            TransferError: as :meth:`recv`.
        """
        if payload is None:
            payload = frames.byte_view(out)
        views = [self._prefix_view, payload] if payload.nbytes else [self._prefix_view]
        got_prefix = 0
        need = frames.PREFIX.size
        while views:
            got = self.stream.recv_into(views, deadline)
            if got_prefix < need:
                got_prefix += got
                if got_prefix >= need:
                    self._expect(kind, out)
            while got:
                n = views[0].nbytes
                if got >= n:
                    got -= n
                    views.pop(0)
                else:
                    views[0] = views[0][got:]
                    got = 0

    def _expect(self, kind: Kind, out: np.ndarray) -> None:
        # Fast path: the whole prefix is predictable; compare bytes, decode only to explain a mismatch.
        key = (False, kind, out.dtype.char, out.shape)
        template = self._templates.get(key)
        if template is None:
            code = frames.dtype_code(out.dtype)
            template = bytearray(frames.encode_prefix(kind, 0, code, out.shape, 0, out.nbytes))
            self._remember(key, template)
        _SEQ.pack_into(template, _SEQ_OFFSET, self._recv_seq)
        if self._prefix == template:
            self._recv_seq += 1
            return
        prefix = self._prefix_ok(None)
        if prefix.kind is not kind:
            raise ProtocolViolation(f"{self.peer} sent a {prefix.kind.name} frame, expected {kind.name}")
        if prefix.header_len or prefix.np_dtype != out.dtype or prefix.shape != out.shape:
            raise ProtocolViolation(
                f"{self.peer} sent {prefix.kind.name} with dtype {prefix.dtype.name}, shape {prefix.shape}, "
                f"header {prefix.header_len} bytes; expected {out.dtype}, {out.shape}, no header"
            )

    def close(self) -> None:
        self.stream.close()
