"""Star all-reduce over real sockets on 127.0.0.1: threads for most cases, processes for crashes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from potluck.errors import (
    ClosedError,
    ConnectError,
    PeerFailed,
    PeerRefused,
    ProtocolViolation,
    TransferError,
)
from potluck.sharding.collective import auth, frames
from potluck.sharding.collective.base import Collective
from potluck.sharding.collective.channel import FrameChannel, SocketStream
from potluck.sharding.collective.frames import Kind
from potluck.sharding.collective.star import DEFAULT_POLL_S, StarMaster, StarWorker
from tests.sharding.collective.star_proc import expected_sum, partial

REPO = Path(__file__).resolve().parents[3]
KEY = bytes(range(32))


class Workers:
    """Worker threads running ``body(worker)``; results and exceptions per rank."""

    def __init__(self, master: StarMaster, body: Callable[[StarWorker], Any], key: bytes = KEY) -> None:
        self.results: dict[int, Any] = {}
        self.errors: dict[int, BaseException] = {}
        self.threads = [
            threading.Thread(target=self._run, args=(master, rank, body, key), daemon=True)
            for rank in range(1, master.world_size)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, master: StarMaster, rank: int, body: Callable[[StarWorker], Any], key: bytes) -> None:
        try:
            with StarWorker.connect(
                master.address, rank, master.world_size, key, master.timeout_s, master.wire_dtype, poll_s=master.poll_s
            ) as worker:
                self.results[rank] = body(worker)
        except BaseException as exc:  # recorded for the test to assert on
            self.errors[rank] = exc

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive()


@contextmanager
def group(n: int, body: Callable[[StarWorker], Any], **kw: Any) -> Iterator[tuple[StarMaster, Workers]]:
    master = StarMaster(n, KEY, **kw)
    workers = Workers(master, body)
    try:
        master.accept_workers(timeout_s=20)
        yield master, workers
    finally:
        master.close()
        workers.join()


@pytest.mark.parametrize("poll_s", [0.0, DEFAULT_POLL_S])
@pytest.mark.parametrize("wire", [np.float32, np.float16])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_all_reduce_sums_in_rank_order(n: int, wire: type, poll_s: float) -> None:
    shapes = [(256,), (4096,), (3, 5), (2, 2, 2, 2), ()]

    def body(worker: StarWorker) -> list[np.ndarray]:
        return [worker.all_reduce(partial(i, worker.rank, int(np.prod(s))).reshape(s)) for i, s in enumerate(shapes)]

    with group(n, body, wire_dtype=wire, poll_s=poll_s) as (master, workers):
        assert isinstance(master, Collective)
        got = [master.all_reduce(partial(i, 0, int(np.prod(s))).reshape(s)) for i, s in enumerate(shapes)]
        workers.join()
    assert not workers.errors
    for i, shape in enumerate(shapes):
        want = expected_sum(i, n, int(np.prod(shape)), np.dtype(wire)).reshape(shape)
        assert got[i].dtype == np.float32 and got[i].shape == shape
        assert got[i].tobytes() == want.tobytes()
        for rank in range(1, n):  # every rank holds the same bits
            assert workers.results[rank][i].tobytes() == want.tobytes()


def test_broadcast_delivers_header_and_array() -> None:
    sent = [
        ({"op": "prefill", "tokens": [1, 2, 3], "blob": b"\x00\xff", "t": 0.5, "x": None}, None),
        ({"op": "decode"}, np.arange(12, dtype=np.float16).reshape(3, 4)),
        ({}, np.ones((2, 1, 3), dtype=np.float32)),
    ]

    def body(worker: StarWorker) -> list[tuple[dict, np.ndarray | None]]:
        return [worker.receive() for _ in sent]

    with group(3, body) as (master, workers):
        for header, array in sent:
            master.broadcast(header, array)
        workers.join()
    assert not workers.errors
    for rank in (1, 2):
        for (header, array), (got_header, got_array) in zip(sent, workers.results[rank], strict=True):
            assert got_header == header
            if array is None:
                assert got_array is None
            else:
                assert got_array is not None and got_array.dtype == array.dtype
                assert np.array_equal(got_array, array)


@pytest.mark.parametrize("wire", [np.float32, np.float16])
def test_gather_collects_every_ranks_slice_of_its_own_shape_in_float32(wire: type) -> None:
    """The vocab-parallel head's gather: ranks send (rows, their vocab slice) float32 arrays of
    different widths, zero included; a float16 all-reduce wire does not round them."""
    widths = [5, 3, 0, 7]

    def slice_of(rank: int, rows: int) -> np.ndarray:
        return (np.arange(rows * widths[rank], dtype=np.float32) / 3 + rank).reshape(rows, widths[rank])

    def body(worker: StarWorker) -> list[list[np.ndarray]]:
        return [worker.gather(slice_of(worker.rank, rows)) for rows in (1, 4, 1)]

    with group(4, body, wire_dtype=wire) as (master, workers):
        got = [master.gather(slice_of(0, rows), [(rows, w) for w in widths]) for rows in (1, 4, 1)]
        workers.join()
    assert not workers.errors and all(r == [[], [], []] for r in workers.results.values())
    for rows, parts in zip((1, 4, 1), got, strict=True):
        for rank, part in enumerate(parts):
            assert part.dtype == np.float32 and part.tobytes() == slice_of(rank, rows).tobytes()


def test_a_gathered_slice_of_the_wrong_shape_fails_that_worker() -> None:
    def body(worker: StarWorker) -> None:
        worker.gather(np.zeros((1, 9 if worker.rank == 2 else 4), np.float32))

    with group(3, body) as (master, _):
        with pytest.raises(PeerFailed) as failed:
            master.gather(np.zeros((1, 4), np.float32), [(1, 4)] * 3)
        assert failed.value.rank == 2
        with pytest.raises(ValueError, match="3 shapes"):
            master.gather(np.zeros((1, 4), np.float32), [(1, 4)])


def test_world_size_one_is_local() -> None:
    with StarMaster(1, KEY) as master:
        master.accept_workers(timeout_s=1)
        a = np.arange(4, dtype=np.float32)
        out = master.all_reduce(a)
        assert np.array_equal(out, a) and out is not a


def test_wrong_key_is_refused_and_the_master_keeps_accepting() -> None:
    master = StarMaster(2, KEY, timeout_s=5)
    errors: list[BaseException] = []

    def intruder_then_worker() -> None:
        try:
            StarWorker.connect(master.address, 1, 2, b"\x01" * 32, timeout_s=5)
        except PeerRefused as exc:
            errors.append(exc)
        with StarWorker.connect(master.address, 1, 2, KEY, timeout_s=5) as worker:
            worker.all_reduce(np.ones(8, np.float32))

    thread = threading.Thread(target=intruder_then_worker)
    thread.start()
    try:
        master.accept_workers(timeout_s=20)
        assert np.array_equal(master.all_reduce(np.ones(8, np.float32)), np.full(8, 2, np.float32))
    finally:
        master.close()
        thread.join(timeout=20)
    assert len(errors) == 1 and "failed authentication" in str(errors[0])


def test_master_rejects_a_forged_proof() -> None:
    """An initiator that ignores the master's proof and sends a forged one gets REFUSED."""
    master = StarMaster(2, KEY, timeout_s=5)
    outcome: list[Any] = []

    def forger() -> None:
        sock = socket.create_connection(master.address)
        channel = FrameChannel(SocketStream(sock))
        deadline = time.monotonic() + 5
        hello = {"role": "star", "rank": 1, "world_size": 2, "wire_dtype": "float32", "nonce": b"n" * 32}
        channel.send(Kind.HELLO, hello, deadline=deadline)
        outcome.append(channel.recv(deadline=deadline).kind)
        channel.send(Kind.AUTH, {"proof": b"\x00" * 32}, deadline=deadline)
        frame = channel.recv(deadline=deadline)
        outcome.append((frame.kind, frame.header))
        channel.close()
        with StarWorker.connect(master.address, 1, 2, KEY, timeout_s=5):
            pass

    thread = threading.Thread(target=forger)
    thread.start()
    try:
        master.accept_workers(timeout_s=20)
    finally:
        master.close()
        thread.join(timeout=20)
    assert outcome == [Kind.CHALLENGE, (Kind.REFUSED, {"reason": "authentication failed"})]


def test_identity_checks_refuse_with_a_reason() -> None:
    master = StarMaster(3, KEY, timeout_s=5)
    refused: list[str] = []

    def joiners() -> None:
        for rank, world, wire in [(3, 3, np.float32), (1, 4, np.float32), (1, 3, np.float16)]:
            try:
                StarWorker.connect(master.address, rank, world, KEY, timeout_s=5, wire_dtype=wire)
            except (PeerRefused, ValueError) as exc:
                refused.append(str(exc))
        first = StarWorker.connect(master.address, 1, 3, KEY, timeout_s=5)
        try:
            StarWorker.connect(master.address, 1, 3, KEY, timeout_s=5)
        except PeerRefused as exc:
            refused.append(str(exc))
        second = StarWorker.connect(master.address, 2, 3, KEY, timeout_s=5)
        first.close()
        second.close()

    thread = threading.Thread(target=joiners)
    thread.start()
    try:
        master.accept_workers(timeout_s=20)
    finally:
        master.close()
        thread.join(timeout=20)
    assert refused[0].startswith("worker rank must be in 1..2")
    assert "world size 4 != 3" in refused[1]
    assert "wire dtype 'float16' != float32" in refused[2]
    assert "rank 1 has already joined" in refused[3]


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 64,
        frames.PREFIX.pack(frames.MAGIC, 1, Kind.HELLO, 3, 1, 0, 2**30, 0, 0, 0, 0, 2**30),  # 1 GiB HELLO
        b"",  # connects and says nothing: the handshake deadline frees the master
    ],
)
def test_garbage_before_auth_is_refused_and_the_master_keeps_accepting(garbage: bytes) -> None:
    master = StarMaster(2, KEY, timeout_s=1.0)

    def attacker_then_worker() -> None:
        with socket.create_connection(master.address) as sock:
            sock.sendall(garbage)
            time.sleep(0.1)
        with StarWorker.connect(master.address, 1, 2, KEY, timeout_s=5) as worker:
            worker.all_reduce(np.ones(4, np.float32))

    thread = threading.Thread(target=attacker_then_worker)
    thread.start()
    try:
        master.accept_workers(timeout_s=20)
        assert np.array_equal(master.all_reduce(np.ones(4, np.float32)), np.full(4, 2, np.float32))
    finally:
        master.close()
        thread.join(timeout=20)


def test_accept_times_out_naming_the_missing_ranks() -> None:
    with StarMaster(3, KEY) as master, pytest.raises(ConnectError, match=r"ranks \[1, 2\] did not join"):
        master.accept_workers(timeout_s=0.3)


def _raw_frame(worker: StarWorker, data: bytes) -> None:
    worker.channel.stream.send([data], time.monotonic() + 5)


@pytest.mark.parametrize(
    ("attack", "cause"),
    [
        # 1 GiB partial: refused from the 40-byte prefix, without waiting or allocating.
        (
            lambda w: _raw_frame(w, frames.encode_prefix(Kind.PARTIAL, 2, 1, (2**28,), 0, 2**30)),
            "exceeds the limit",
        ),
        (lambda w: _raw_frame(w, b"\xde\xad" * 40), "bad magic"),
        (
            lambda w: _raw_frame(w, frames.encode_frame(Kind.PARTIAL, 9, None, np.ones(16, np.float32))[0]),
            "sequence",
        ),
        (lambda w: w.all_reduce(np.ones(15, np.float32)), r"shape \(15,\)"),
        (
            lambda w: w.channel.send(Kind.BROADCAST, {"a": 1}, deadline=time.monotonic() + 5),
            "BROADCAST frame",
        ),
        (lambda w: w.close(), "closed the channel"),
    ],
)
def test_bad_frame_from_a_worker_raises_peer_failed(attack: Callable[[StarWorker], Any], cause: str) -> None:
    def body(worker: StarWorker) -> None:
        if worker.rank == 2:
            try:
                attack(worker)
            except (TransferError, ClosedError):
                pass  # the master dropped us: expected after a bad frame
            return
        worker.all_reduce(np.ones(16, np.float32))

    with group(3, body, timeout_s=10) as (master, _workers):
        start = time.monotonic()
        with pytest.raises(PeerFailed, match=cause) as info:
            master.all_reduce(np.ones(16, np.float32))
        assert info.value.rank == 2
        assert time.monotonic() - start < 5  # refused at once, not at the 10 s deadline
        with pytest.raises(PeerFailed, match="group is broken"):
            master.broadcast({"op": "again"})


def test_stalled_worker_thread_raises_peer_failed_within_the_timeout() -> None:
    release = threading.Event()

    def body(worker: StarWorker) -> None:
        if worker.rank == 1:
            release.wait(20)  # connected and authenticated, but never contributes
            return
        with pytest.raises(TransferError):
            worker.all_reduce(np.ones(4, np.float32))

    with group(3, body, timeout_s=0.5) as (master, _workers):
        start = time.monotonic()
        with pytest.raises(PeerFailed, match="timed out") as info:
            master.all_reduce(np.ones(4, np.float32))
        elapsed = time.monotonic() - start
        release.set()
    assert info.value.rank == 1
    assert 0.4 < elapsed < 5


def test_worker_sees_the_master_go_away() -> None:
    master = StarMaster(2, KEY, timeout_s=5)
    holder: dict[str, StarWorker] = {}
    thread = threading.Thread(
        target=lambda: holder.setdefault("w", StarWorker.connect(master.address, 1, 2, KEY, timeout_s=5))
    )
    thread.start()
    master.accept_workers(timeout_s=20)
    thread.join(timeout=20)
    worker = holder["w"]
    master.close()
    with pytest.raises(TransferError, match="closed the channel"):
        worker.receive()
    worker.close()
    with pytest.raises(ClosedError):
        worker.all_reduce(np.ones(2, np.float32))
    with pytest.raises(ClosedError):
        master.all_reduce(np.ones(2, np.float32))


def test_worker_times_out_when_the_master_stalls() -> None:
    master = StarMaster(2, KEY, timeout_s=5)
    holder: dict[str, StarWorker] = {}
    thread = threading.Thread(
        target=lambda: holder.setdefault("w", StarWorker.connect(master.address, 1, 2, KEY, timeout_s=0.3))
    )
    thread.start()
    try:
        master.accept_workers(timeout_s=20)
        thread.join(timeout=20)
        with pytest.raises(TransferError, match="timed out"):
            holder["w"].all_reduce(np.ones(2, np.float32))
    finally:
        master.close()
        holder["w"].close()


def test_wrong_argument_types() -> None:
    with StarMaster(1, KEY) as master:
        with pytest.raises(TypeError, match="float32"):
            master.all_reduce(np.ones(3, np.float64))
        with pytest.raises(ProtocolViolation, match="float32 or float16"):
            master.broadcast({}, np.ones(3, np.int32))
    with pytest.raises(ValueError, match="32 bytes"):
        StarMaster(2, b"short")
    with pytest.raises(ValueError, match="float32 or float16"):
        StarMaster(2, KEY, wire_dtype=np.float64)
    assert len(auth.new_session_key()) == 32


# -- separate processes --------------------------------------------------------------------------


def spawn_workers(master: StarMaster, key: bytes) -> list[subprocess.Popen[bytes]]:
    procs = []
    for rank in range(1, master.world_size):
        args = [*map(str, master.address), str(rank), str(master.world_size)]
        args += [master.wire_dtype.name, str(master.timeout_s)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sharding.collective.star_proc", *args], stdin=subprocess.PIPE, cwd=REPO
        )
        assert proc.stdin is not None
        proc.stdin.write(key.hex().encode() + b"\n")  # the key travels on stdin, never in argv
        proc.stdin.close()
        procs.append(proc)
    return procs


@contextmanager
def process_group(n: int, wire: type, timeout_s: float) -> Iterator[tuple[StarMaster, list[subprocess.Popen[bytes]]]]:
    key = auth.new_session_key()
    master = StarMaster(n, key, timeout_s=timeout_s, wire_dtype=wire)
    procs = spawn_workers(master, key)
    try:
        master.accept_workers(timeout_s=60)
        yield master, procs
    finally:
        master.close()
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def master_reduce(master: StarMaster, seed: int, n: int, repeat: int = 1, **extra: Any) -> np.ndarray:
    master.broadcast({"op": "reduce", "seed": seed, "n": n, "repeat": repeat, **extra})
    out = np.empty(0)
    for _ in range(repeat):
        out = master.all_reduce(partial(seed, 0, n))
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("wire", [np.float32, np.float16])
def test_worker_processes_sum_correctly(wire: type) -> None:
    with process_group(3, wire, timeout_s=10) as (master, procs):
        for seed, n in [(1, 4096), (2, 16384), (3, 7)]:
            got = master_reduce(master, seed, n, repeat=5)
            assert got.tobytes() == expected_sum(seed, 3, n, np.dtype(wire)).tobytes()
        master.broadcast({"op": "stop"})
        assert [proc.wait(timeout=20) for proc in procs] == [0, 0]  # the workers checked their sums too


@pytest.mark.e2e
def test_killed_worker_process_mid_all_reduce_raises_peer_failed() -> None:
    with process_group(3, np.float32, timeout_s=10) as (master, procs):
        master_reduce(master, 5, 1024)
        # Rank 2 sleeps before contributing; it is SIGKILLed while the master waits for it.
        threading.Timer(0.3, os.kill, args=(procs[1].pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(PeerFailed) as info:
            master_reduce(master, 6, 1024, stall_rank=2, stall_s=30.0)
        assert info.value.rank == 2
        assert time.monotonic() - start < 8  # a dead peer is noticed from its reset, before the deadline
    assert procs[0].returncode in (0, 4)  # the survivor saw the group end


@pytest.mark.e2e
def test_stopped_worker_process_raises_peer_failed_within_the_timeout() -> None:
    with process_group(3, np.float32, timeout_s=1.0) as (master, procs):
        master_reduce(master, 7, 1024)
        os.kill(procs[0].pid, signal.SIGSTOP)  # frozen, socket still open
        start = time.monotonic()
        with pytest.raises(PeerFailed, match="timed out") as info:
            master_reduce(master, 8, 1024)
        assert info.value.rank == 1
        assert time.monotonic() - start < 6


def test_another_byte_stream_slots_in_under_the_star() -> None:
    """The star over a Unix socketpair via admit()/over(): the seam the libp2p-stream fallback uses."""
    with StarMaster(2, KEY, timeout_s=5) as master:
        a, b = socket.socketpair()
        holder: dict[str, StarWorker] = {}
        thread = threading.Thread(
            target=lambda: holder.setdefault(
                "w", StarWorker.over(FrameChannel(SocketStream(b, peer="pair")), 1, 2, KEY)
            )
        )
        thread.start()
        assert master.admit(FrameChannel(SocketStream(a, peer="pair"))) == 1
        thread.join(timeout=10)
        with holder["w"] as worker:
            reducer = threading.Thread(
                target=lambda: holder.setdefault("sum", worker.all_reduce(np.ones(3, np.float32)))
            )
            reducer.start()
            assert np.array_equal(master.all_reduce(np.ones(3, np.float32)), np.full(3, 2, np.float32))
            reducer.join(timeout=10)


class TrickleStream:
    """A ByteStream that is not a SocketStream (the generic lane path) and delivers at most ``step``
    bytes per receive, so every frame arrives in pieces (prefix split included)."""

    def __init__(self, inner: SocketStream, step: int) -> None:
        self.inner, self.step, self.peer = inner, step, inner.peer

    def send(self, buffers: Any, deadline: float) -> None:
        self.inner.send(buffers, deadline)

    def recv_into(self, buffers: Any, deadline: float) -> int:
        return self.inner.recv_into([memoryview(buffers[0])[: self.step]], deadline)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("step", [7, 41, 1000])
@pytest.mark.parametrize("wire", [np.float32, np.float16])
def test_all_reduce_over_a_stream_that_delivers_frames_in_pieces(step: int, wire: type) -> None:
    shapes = [(300,), (300,), (2, 3), ()]
    with StarMaster(2, KEY, timeout_s=5, wire_dtype=wire) as master:
        a, b = socket.socketpair()
        holder: dict[str, Any] = {}

        def work() -> None:
            channel = FrameChannel(TrickleStream(SocketStream(b, peer="pair"), step))  # type: ignore[arg-type]
            with StarWorker.over(channel, 1, 2, KEY, wire_dtype=wire) as worker:
                holder["sums"] = [
                    worker.all_reduce(partial(i, 1, int(np.prod(s))).reshape(s)) for i, s in enumerate(shapes)
                ]

        thread = threading.Thread(target=work)
        thread.start()
        assert master.admit(FrameChannel(TrickleStream(SocketStream(a, peer="pair"), step))) == 1  # type: ignore[arg-type]
        got = [master.all_reduce(partial(i, 0, int(np.prod(s))).reshape(s)) for i, s in enumerate(shapes)]
        thread.join(timeout=10)
    for i, shape in enumerate(shapes):
        want = expected_sum(i, 2, int(np.prod(shape)), np.dtype(wire)).reshape(shape)
        assert got[i].tobytes() == want.tobytes() and got[i].shape == shape
        assert holder["sums"][i].tobytes() == want.tobytes() and holder["sums"][i].shape == shape


def test_a_bad_prefix_in_pieces_is_refused_as_soon_as_it_is_complete() -> None:
    """The prefix of a wrong frame arrives in pieces and its body never does: refused at once anyway."""
    with StarMaster(2, KEY, timeout_s=10) as master:
        a, b = socket.socketpair()
        thread = threading.Thread(target=lambda: StarWorker.over(FrameChannel(SocketStream(b, peer="p")), 1, 2, KEY))
        thread.start()
        assert master.admit(FrameChannel(TrickleStream(SocketStream(a, peer="p"), 5))) == 1  # type: ignore[arg-type]
        thread.join(timeout=10)
        # A PARTIAL whose prefix announces 64 floats, where the master expects 16; no body follows.
        b.sendall(frames.encode_prefix(Kind.PARTIAL, 2, frames.DType.FLOAT32, (64,), 0, 256))
        start = time.monotonic()
        with pytest.raises(PeerFailed, match=r"shape \(64,\)"):
            master.all_reduce(np.ones(16, np.float32))
        assert time.monotonic() - start < 5
        b.close()
