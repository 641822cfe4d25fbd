"""Star all-reduce over direct TCP: :class:`StarMaster` (rank 0) and :class:`StarWorker` (ranks 1..N-1).

Pattern (TPI-LLM, Li et al. 2024, §3.3; distributed-llama's ``SYNC_NODE_SLICES``): each worker sends its
partial sum to the master (hop 1), the master adds the partials in rank order 0, 1, 2, ... (so the result
is bit-for-bit deterministic) and sends the sum back to every worker (hop 2). Two network hops per
all-reduce; at hidden-state sizes link latency, not bandwidth, dominates, which is why the star beats a
ring here.

Wire: :mod:`potluck.sharding.collective.frames` over :class:`~potluck.sharding.collective.channel.FrameChannel` over
:class:`~potluck.sharding.collective.channel.SocketStream` (TCP_NODELAY). Connections are admitted by the mutual
HMAC-SHA256 handshake of :mod:`potluck.sharding.collective.auth` with the per-session key. The all-reduce runs
over :class:`~potluck.sharding.collective.channel.ArrayLane` objects (one per worker and shape, prefixes packed
once): per frame one ``recv_into`` of the whole frame into a preallocated buffer checked with one
bytes comparison, and one ``sendmsg`` of prefix + array bytes; no msgpack, no copies. The master
receives in rank order with blocking reads (no readiness poll: that would add a syscall per operation).

Timeouts: every operation has one deadline, ``timeout_s`` after it starts, covering all its sends and
receives (a worker's wait for the next broadcast uses ``idle_timeout_s`` instead, no deadline by
default, since a group may idle between requests). On the master a worker that died, stalled past
the deadline or sent a bad frame raises :class:`~potluck.errors.PeerFailed` with its ``rank``; the
group is then broken: that rank's connection is closed and every later call raises the same
``PeerFailed`` (the engine re-plans with a new group). A worker raises
:class:`~potluck.errors.TransferError` when the master goes away or stalls, and
:class:`~potluck.errors.ClosedError` after its own :meth:`close`.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from potluck.errors import (
    ClosedError,
    ConnectError,
    PeerFailed,
    PeerRefused,
    ProtocolViolation,
    TransferError,
)
from potluck.sharding.collective import auth, frames
from potluck.sharding.collective.channel import ArrayLane, FrameChannel, SocketStream, configure_socket
from potluck.sharding.collective.frames import Kind

__all__ = ["StarMaster", "StarWorker"]

log = logging.getLogger(__name__)

_WIRE_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
_CLOSE_GRACE_S = 0.5
#: Busy-poll budget of a receive before it blocks, for ranks with a core of their own (seconds;
#: 100 and 300 us measured alike on the 1.1B bench model, 13-17 % off the N = 2 decode step).
DEFAULT_POLL_S = 100e-6
_F32 = np.dtype(np.float32)
_MAX_CACHED_LANES = 4  # shapes whose lanes (and receive buffers) the master keeps between calls
_MAX_CACHED_FRAME = 1 << 20  # bytes; larger (prefill) frames get one-off lanes


def _wire_dtype(dtype: Any) -> np.dtype[Any]:
    wire = np.dtype(dtype)
    if wire not in _WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be float32 or float16, got {wire}")
    return wire


def _check_reduce_input(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous float32 array of at most 4 dimensions (the all-reduce callers skip
    this call for arrays that already are: see :func:`_ready_for_wire`)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise TypeError("all_reduce takes a float32 numpy array")
    if array.ndim > frames.MAX_NDIM:
        raise ValueError(f"all_reduce takes at most {frames.MAX_NDIM} dimensions")
    return np.require(array, requirements="C")


def _ready_for_wire(array: Any) -> bool:
    """True for what the hot path takes as is: a C-contiguous float32 ndarray of at most 4 dimensions."""
    return type(array) is np.ndarray and array.dtype is _F32 and array.flags.c_contiguous and array.ndim <= 4


def _say_goodbye(channel: FrameChannel) -> None:
    """Best-effort CLOSE frame before closing: the peer learns at once that the group ended."""
    try:
        channel.send(Kind.CLOSE, None, deadline=time.monotonic() + _CLOSE_GRACE_S)
    except (TransferError, ClosedError) as exc:
        log.debug("no goodbye to %s: %s", channel.peer, exc)
    channel.close()


class StarMaster:
    """Rank 0 of a star group: binds at once, then :meth:`accept_workers` admits ranks 1..N-1.

    Args:
        world_size: number of members including the master (>= 1).
        session_key: 32-byte key shared with the workers out of band (never on a command line).
        host, port: where to listen (port 0 picks a free port; see :attr:`address`).
        timeout_s: deadline of each operation, in seconds.
        wire_dtype: float32 (default, exact) or float16 (half the bytes; sums rounded to float16).
        max_frame_bytes: largest frame accepted from or sent to a worker.
        poll_s: busy-poll budget of each receive before it blocks (:class:`SocketStream`); 0 = block
            at once. :data:`DEFAULT_POLL_S` where every rank has a core of its own.

    Not thread-safe: one thread drives a group.
    """

    rank: int = 0

    def __init__(
        self,
        world_size: int,
        session_key: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        timeout_s: float = 10.0,
        wire_dtype: Any = np.float32,
        *,
        max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES,
        poll_s: float = 0.0,
    ) -> None:
        if world_size < 1:
            raise ValueError("world_size must be >= 1")
        self.world_size = world_size
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.wire_dtype = _wire_dtype(wire_dtype)
        self.max_frame_bytes = max_frame_bytes
        self._key = auth.check_key(session_key)
        self._channels: dict[int, FrameChannel] = {}
        self._lanes: dict[tuple[int, ...], list[tuple[int, ArrayLane]]] = {}  # by shape, rank order
        self._gather_lanes: dict[tuple[int, tuple[int, ...]], ArrayLane] = {}  # by (rank, shape)
        self._wire_is_f32 = self.wire_dtype == np.float32
        self._failed: PeerFailed | None = None
        self._closed = False
        self._listener: socket.socket | None = socket.create_server((host, port), backlog=max(8, world_size))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]

    # -- joining -------------------------------------------------------------------------------------

    def accept_workers(self, timeout_s: float) -> None:
        """Block until ranks 1..N-1 have connected and authenticated, then stop listening.

        Connections that fail the handshake (wrong key, garbage, rank out of range or taken, wrong
        world size or wire dtype) are refused, logged and closed; accepting goes on.

        Raises:
            ConnectError: some ranks did not join within ``timeout_s`` (the missing ranks are named).
            ClosedError: the master was closed.
        """
        deadline = time.monotonic() + timeout_s
        while len(self._channels) < self.world_size - 1:
            if self._closed or self._listener is None:
                raise ClosedError("star master is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, self.world_size)) - set(self._channels))
                raise ConnectError(f"ranks {missing} did not join the star within {timeout_s} s")
            self._listener.settimeout(remaining)
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                raise ConnectError(f"accepting workers failed: {exc}") from exc
            configure_socket(sock)
            stream = SocketStream(sock, peer=f"{addr[0]}:{addr[1]}", poll_s=self.poll_s)
            channel = FrameChannel(stream, max_frame_bytes=self.max_frame_bytes)
            self._admit(channel, min(deadline, time.monotonic() + self.timeout_s))
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def admit(self, channel: FrameChannel, timeout_s: float | None = None) -> int | None:
        """Authenticate a worker that reached us over another byte stream (the seam for the libp2p
        stream fallback: wrap the stream in a :class:`FrameChannel` and pass it here).

        Returns:
            The worker's rank, or None when it was refused (logged; the channel is closed).
        """
        return self._admit(channel, time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s))

    def _admit(self, channel: FrameChannel, deadline: float) -> int | None:
        try:
            fields = auth.respond(channel, self._key, self._check_hello, deadline=deadline)
        except (PeerRefused, ProtocolViolation, TransferError) as exc:
            log.warning("refused star connection from %s: %s", channel.peer, exc)
            channel.close()
            return None
        rank: int = fields["rank"]
        self._channels[rank] = channel
        log.info("star worker rank %d joined from %s", rank, channel.peer)
        return rank

    def _check_hello(self, hello: dict[str, Any]) -> None:
        rank = hello.get("rank")
        if hello.get("role") != "star":
            raise PeerRefused(f"role {hello.get('role')!r} is not 'star'")
        if hello.get("world_size") != self.world_size:
            raise PeerRefused(f"world size {hello.get('world_size')!r} != {self.world_size}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank < self.world_size:
            raise PeerRefused(f"rank {rank!r} is outside 1..{self.world_size - 1}")
        if rank in self._channels:
            raise PeerRefused(f"rank {rank} has already joined")
        if hello.get("wire_dtype") != _WIRE_DTYPES[self.wire_dtype]:
            raise PeerRefused(f"wire dtype {hello.get('wire_dtype')!r} != {_WIRE_DTYPES[self.wire_dtype]}")

    # -- the collective ------------------------------------------------------------------------------

    def _ready(self) -> None:
        if self._closed:
            raise ClosedError("star master is closed")
        if self._failed is not None:
            raise PeerFailed(f"star group is broken: {self._failed}", self._failed.rank)
        if len(self._channels) != self.world_size - 1:
            raise ClosedError("accept_workers() has not admitted every worker yet")

    def _fail(self, rank: int, exc: Exception, what: str) -> PeerFailed:
        self._failed = PeerFailed(f"worker rank {rank} failed during {what}: {exc}", rank)
        log.warning("%s", self._failed)
        channel = self._channels.get(rank)
        if channel is not None:
            channel.close()
        return self._failed

    def broadcast(self, header: dict[str, Any], array: np.ndarray | None = None) -> None:
        """Send ``header`` (msgpack-able, str keys) and an optional float32/float16 array to every worker.

        Raises:
            PeerFailed: a worker is gone or stalled past ``timeout_s``.
            ProtocolViolation: header/array cannot be framed (nothing was sent).
            ClosedError: the master was closed.
        """
        self._ready()
        packed = frames.pack_header(header)
        wire = None
        if array is not None:
            if array.dtype not in _WIRE_DTYPES:
                raise ProtocolViolation(f"broadcast arrays must be float32 or float16, got {array.dtype}")
            wire = frames.wire_array(array)
        deadline = time.monotonic() + self.timeout_s
        for rank, channel in sorted(self._channels.items()):
            try:
                channel.send_packed(Kind.BROADCAST, packed, wire, deadline=deadline)
            except (TransferError, ClosedError) as exc:
                raise self._fail(rank, exc, "broadcast") from exc

    def receive(self) -> tuple[dict[str, Any], np.ndarray | None]:
        raise TypeError("receive() is for workers; the master broadcasts")

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        """Sum ``array`` (float32, same shape on every rank) over the group; returns a new float32 array.

        Partials are added in rank order 0, 1, ..., N-1. With a float16 wire the master returns the
        float16-rounded sum it sends, so every rank holds the same bits.

        Raises:
            PeerFailed: a worker died, stalled past ``timeout_s`` or sent a bad frame.
            ClosedError: the master was closed.
        """
        own = array if _ready_for_wire(array) else _check_reduce_input(array)
        if self._failed is not None or self._closed or len(self._channels) != self.world_size - 1:
            self._ready()
        if self.world_size == 1:
            return own.copy()
        deadline = time.monotonic() + self.timeout_s
        lanes = self._lanes.get(own.shape) or self._members(own.shape)  # [(rank, lane)], rank order
        # Hop 1: receive every partial into its lane's buffer, then add them in rank order into a fresh
        # result (the caller keeps it), so the sum is bit-for-bit the same whatever the arrival order.
        total = None
        for rank, lane in lanes:
            try:
                partial = lane.recv(deadline)
            except (TransferError, ClosedError, ProtocolViolation) as exc:
                raise self._fail(rank, exc, "all-reduce (partial sum)") from exc
            if total is None:
                total = np.add(own, partial)
                if type(total) is not np.ndarray:  # 0-d operands give a numpy scalar
                    total = np.array(total, _F32)
            else:
                np.add(total, partial, out=total)
        assert total is not None  # world_size > 1
        # Hop 2: the sum goes back, one sendmsg (prefix + the sum's bytes) per worker.
        wire = total if self._wire_is_f32 else total.astype(self.wire_dtype)
        for rank, lane in lanes:
            try:
                lane.send(wire, deadline)
            except (TransferError, ClosedError) as exc:
                raise self._fail(rank, exc, "all-reduce (sum)") from exc
        return total if wire is total else wire.astype(np.float32)

    def gather(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]] = ()) -> list[np.ndarray]:
        """``[array, rank 1's, ..., rank N-1's]``: every worker's float32 array of ``shapes[rank]``,
        received in rank order (see :meth:`Collective.gather`).

        Raises:
            PeerFailed: a worker died, stalled past ``timeout_s`` or sent another shape.
            ValueError: ``shapes`` does not give one shape per rank.
            ClosedError: the master was closed.
        """
        own = _check_reduce_input(array)
        if len(shapes) != self.world_size:
            raise ValueError(f"gather needs {self.world_size} shapes, got {len(shapes)}")
        self._ready()
        deadline = time.monotonic() + self.timeout_s
        out = [own.copy()]
        for rank, channel in sorted(self._channels.items()):
            lane = self._gather_lanes.get((rank, tuple(shapes[rank])))
            if lane is None:
                lane = ArrayLane(channel, Kind.REDUCED, Kind.PARTIAL, _F32, tuple(shapes[rank]))
                if len(self._gather_lanes) >= _MAX_CACHED_LANES * self.world_size:
                    self._gather_lanes.clear()
                self._gather_lanes[(rank, lane.shape)] = lane
            try:
                out.append(lane.recv(deadline).copy())
            except (TransferError, ClosedError, ProtocolViolation) as exc:
                raise self._fail(rank, exc, "gather") from exc
        return out

    def _members(self, shape: tuple[int, ...]) -> list[tuple[int, ArrayLane]]:
        """An all-reduce lane of ``shape`` per worker, in rank order (kept for a few shapes)."""
        lanes = [
            (rank, ArrayLane(channel, Kind.REDUCED, Kind.PARTIAL, self.wire_dtype, shape))
            for rank, channel in sorted(self._channels.items())
        ]
        if lanes[0][1].size <= _MAX_CACHED_FRAME:
            if len(self._lanes) >= _MAX_CACHED_LANES:
                self._lanes.clear()
            self._lanes[shape] = lanes
        return lanes

    def channel(self, rank: int) -> FrameChannel:
        """The authenticated channel to ``rank``, e.g. for :mod:`potluck.sharding.collective.transfer` before the
        collective starts. Both ends must use it in lockstep."""
        return self._channels[rank]

    def close(self) -> None:
        """Tell every worker the group ended (CLOSE frame, best effort) and close all sockets."""
        if self._closed:
            return
        self._closed = True
        for channel in self._channels.values():
            _say_goodbye(channel)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> StarMaster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StarWorker:
    """Rank 1..N-1 of a star group, connected to the master. Build it with :meth:`connect`."""

    def __init__(
        self,
        channel: FrameChannel,
        rank: int,
        world_size: int,
        timeout_s: float,
        wire_dtype: np.dtype[Any],
        idle_timeout_s: float = math.inf,
    ) -> None:
        self.channel = channel
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.wire_dtype = wire_dtype
        self._closed = False
        self._lane: ArrayLane | None = None  # all-reduce frames of the last shape
        self._gather_lane: ArrayLane | None = None  # gather frames of the last shape
        self._wire_is_f32 = wire_dtype == _F32

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        rank: int,
        world_size: int,
        session_key: bytes,
        timeout_s: float = 10.0,
        wire_dtype: Any = np.float32,
        *,
        idle_timeout_s: float = math.inf,
        max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES,
        poll_s: float = 0.0,
    ) -> StarWorker:
        """Connect to the master at ``address`` and authenticate as ``rank``.

        ``timeout_s`` bounds the connection, the handshake and every :meth:`all_reduce`;
        ``idle_timeout_s`` bounds :meth:`receive`, the wait for the master's next broadcast, which may
        legitimately be long while the group is idle (default: no deadline; a master that dies still
        shows up as a closed connection, and one whose host vanishes through TCP keepalive in ~11 s).
        ``poll_s``: as :class:`StarMaster`'s.

        Raises:
            ConnectError: no TCP connection, or it broke during the handshake, within ``timeout_s``.
            PeerRefused: the master refused us (wrong key, rank taken...) or failed to prove the key.
            ProtocolViolation: the master spoke garbage.
        """
        if not 1 <= rank < world_size:
            raise ValueError(f"worker rank must be in 1..{world_size - 1}, got {rank}")
        try:
            sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            raise ConnectError(f"could not connect to star master at {address}: {exc}") from exc
        configure_socket(sock)
        channel = FrameChannel(SocketStream(sock, poll_s=poll_s), max_frame_bytes=max_frame_bytes)
        return cls.over(channel, rank, world_size, session_key, timeout_s, wire_dtype, idle_timeout_s=idle_timeout_s)

    @classmethod
    def over(
        cls,
        channel: FrameChannel,
        rank: int,
        world_size: int,
        session_key: bytes,
        timeout_s: float = 10.0,
        wire_dtype: Any = np.float32,
        *,
        idle_timeout_s: float = math.inf,
    ) -> StarWorker:
        """Authenticate as ``rank`` over an already open channel.

        The channel may sit on any :class:`~potluck.sharding.collective.channel.ByteStream`, e.g. the libp2p
        stream fallback; the master side is :meth:`StarMaster.admit`. Same errors as :meth:`connect`;
        the channel is closed when the handshake fails."""
        if not 1 <= rank < world_size:
            raise ValueError(f"worker rank must be in 1..{world_size - 1}, got {rank}")
        wire = _wire_dtype(wire_dtype)
        key = auth.check_key(session_key)
        hello = {"role": "star", "rank": rank, "world_size": world_size, "wire_dtype": _WIRE_DTYPES[wire]}
        try:
            auth.initiate(channel, key, hello, deadline=time.monotonic() + timeout_s)
        except TransferError as exc:
            channel.close()
            raise ConnectError(f"star handshake with {channel.peer} broke: {exc}") from exc
        except (PeerRefused, ProtocolViolation):
            channel.close()
            raise
        return cls(channel, rank, world_size, timeout_s, wire, idle_timeout_s)

    def _deadline(self, timeout_s: float) -> float:
        if self._closed:
            raise ClosedError("star worker is closed")
        return time.monotonic() + timeout_s

    def broadcast(self, header: dict[str, Any], array: np.ndarray | None = None) -> None:
        raise TypeError("broadcast() is for the master; workers receive")

    def receive(self, timeout_s: float | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
        """The next ``(header, array)`` broadcast by the master; the array is a fresh owned array.

        Args:
            timeout_s: how long to wait, in seconds (default: ``idle_timeout_s`` given to :meth:`connect`).

        Raises:
            TransferError: the master closed the group, went away or sent nothing within the deadline.
            ProtocolViolation: the master sent something other than a broadcast.
            ClosedError: we closed this worker.
        """
        frame = self.channel.recv(deadline=self._deadline(self.idle_timeout_s if timeout_s is None else timeout_s))
        if frame.kind is not Kind.BROADCAST:
            raise ProtocolViolation(f"expected a BROADCAST frame from the master, got {frame.kind.name}")
        return frame.header, frame.array

    def all_reduce(self, array: np.ndarray) -> np.ndarray:
        """Send this rank's partial sum; return the group's sum (new float32 array, same shape).

        Raises:
            TransferError: the master went away or stalled past ``timeout_s``.
            ProtocolViolation: the master answered with a malformed or mismatched frame.
            ClosedError: we closed this worker.
        """
        own = array if _ready_for_wire(array) else _check_reduce_input(array)
        if self._closed:
            raise ClosedError("star worker is closed")
        deadline = time.monotonic() + self.timeout_s
        lane = self._lane
        if lane is None or lane.shape != own.shape:
            lane = self._lane = ArrayLane(self.channel, Kind.PARTIAL, Kind.REDUCED, self.wire_dtype, own.shape)
        if self._wire_is_f32:
            lane.send(own, deadline)
            total = np.empty(own.shape, _F32)  # fresh: the caller keeps it
            lane.recv_into(total, deadline)
            return total
        lane.send(own.astype(self.wire_dtype), deadline)
        return lane.recv(deadline).astype(np.float32)

    def gather(self, array: np.ndarray, shapes: Sequence[tuple[int, ...]] = ()) -> list[np.ndarray]:
        """Send this rank's float32 array to the master (see :meth:`Collective.gather`); returns ``[]``.

        Raises:
            TransferError: the master went away or stalled past ``timeout_s``.
            ProtocolViolation: the array exceeds the frame limit.
            ValueError: ``shapes`` given (only the master checks shapes).
            ClosedError: we closed this worker.
        """
        own = _check_reduce_input(array)
        if shapes:
            raise ValueError("gather shapes are the master's to check; a worker passes none")
        if self._closed:
            raise ClosedError("star worker is closed")
        lane = self._gather_lane
        if lane is None or lane.shape != own.shape:
            lane = self._gather_lane = ArrayLane(self.channel, Kind.PARTIAL, Kind.REDUCED, _F32, own.shape)
        lane.send(own, time.monotonic() + self.timeout_s)
        return []

    def close(self) -> None:
        """Say goodbye to the master (best effort) and close the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        _say_goodbye(self.channel)

    def __enter__(self) -> StarWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
