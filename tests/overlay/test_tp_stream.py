"""The star over real libp2p streams (two hosts in this process): handshake, all-reduce, shard
transfer, a vanished peer, and the strict schemas of the tensor-parallel frames."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from potluck.errors import PeerRefused, ProtocolViolation, TransferError
from potluck.overlay.endpoint import StandaloneHost
from potluck.overlay.tp_stream import Libp2pByteStream
from potluck.overlay.wire import (
    MAX_TP_PAYLOAD,
    MAX_TP_REPLY_PAYLOAD,
    TpJoinFrame,
    TpStreamHello,
    decode_payload,
    encode,
)
from potluck.sharding.collective import transfer
from potluck.sharding.collective.auth import new_session_key
from potluck.sharding.collective.channel import FrameChannel
from potluck.sharding.collective.star import StarMaster, StarWorker

pytestmark = pytest.mark.timeout(120)
PROTOCOL = "/potluck/test-star/1"


@pytest.fixture
def pair(tmp_path: Path):
    """(master endpoint, worker endpoint, queue of master-side byte streams)."""
    master = StandaloneHost(tmp_path / "m").start()
    worker = StandaloneHost(tmp_path / "w").start()
    arrived: queue.Queue[Libp2pByteStream] = queue.Queue()
    bridge = master.bridge

    async def handler(stream, peer):
        done = anyio.Event()

        async def closed() -> None:
            done.set()

        arrived.put(Libp2pByteStream(bridge, stream, peer, on_close=closed))
        await done.wait()

    master.set_handler(PROTOCOL, handler)
    try:
        yield master, worker, arrived
    finally:
        worker.stop()
        master.stop()


def open_channel(worker: StandaloneHost, master: StandaloneHost) -> FrameChannel:
    peer = worker.run(worker.host.connect, master.addr)
    stream = worker.run(worker.host.open_stream, peer, PROTOCOL)
    return FrameChannel(Libp2pByteStream(worker.bridge, stream, peer))


def join(pair, key: bytes, worker_key: bytes | None = None, timeout_s: float = 20.0):
    master_ep, worker_ep, arrived = pair
    star = StarMaster(2, key, timeout_s=timeout_s)
    result: dict[str, object] = {}

    def connect() -> None:
        try:
            result["worker"] = StarWorker.over(
                open_channel(worker_ep, master_ep), 1, 2, worker_key or key, timeout_s=20
            )
        except (PeerRefused, TransferError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=connect)
    thread.start()
    rank = star.admit(FrameChannel(arrived.get(timeout=30)), timeout_s=20)
    thread.join(30)
    return star, rank, result


def test_all_reduce_and_shard_transfer_over_libp2p(pair, tmp_path):
    star, rank, result = join(pair, new_session_key())
    assert rank == 1
    worker: StarWorker = result["worker"]  # type: ignore[assignment]
    shard = tmp_path / "shard.bin"
    shard.write_bytes(os.urandom(5 * 1024 * 1024 + 123))  # two 4 MiB chunks, the last one short
    manifest = transfer.build_manifest(shard)
    fetched: dict[str, Path] = {}

    def work() -> None:
        fetched["path"] = transfer.fetch_shard(worker.channel, "model", "plan-r1", tmp_path / "cache")
        for i in range(20):
            worker.all_reduce(np.full((3, 256), float(i), np.float32))

    thread = threading.Thread(target=work)
    thread.start()
    sent = transfer.serve_shards(star.channel(1), {("model", "plan-r1"): (shard, manifest)})
    for i in range(20):
        total = star.all_reduce(np.full((3, 256), 1.0, np.float32))
        assert np.array_equal(total, np.full((3, 256), i + 1.0, np.float32))
    thread.join(30)
    assert sent == 2
    assert fetched["path"].read_bytes() == shard.read_bytes()
    star.close()
    with pytest.raises(TransferError):
        worker.receive(timeout_s=10)  # the master said goodbye over the stream
    worker.close()


def test_wrong_session_key_is_refused_over_libp2p(pair):
    star, rank, result = join(pair, new_session_key(), worker_key=new_session_key())
    assert rank is None
    assert isinstance(result["error"], (PeerRefused, TransferError))
    star.close()


def test_a_vanished_worker_fails_the_master_within_the_deadline(pair):
    star, rank, _ = join(pair, new_session_key(), timeout_s=3.0)
    assert rank == 1
    worker_ep = pair[1]
    worker_ep.stop()  # the worker's host goes away
    began = time.monotonic()
    with pytest.raises(TransferError):
        star.all_reduce(np.ones(16, np.float32))
    assert time.monotonic() - began < 30  # within the deadline, never a hang
    star.close()


def test_tp_frames_round_trip_and_reject_bad_fields():
    """The overlay's TP frames: the join payload is opaque but bounded; the stream hello is strict.
    (The join request's own schema is sharding's: tests/sharding/orchestration/test_messages.py.)"""
    import msgpack

    join = TpJoinFrame(payload=b"\x80")
    assert decode_payload(encode(join)[4:]) == join
    hello = TpStreamHello(session="a" * 32, rank=3)
    assert decode_payload(encode(hello)[4:]) == hello
    for bad in (
        {"t": "tp_join", "payload": b""},
        {"t": "tp_join", "payload": b"x" * (MAX_TP_PAYLOAD + 1)},
        {"t": "tp_join", "payload": "not bytes"},
        {"t": "tp_join", "payload": b"x", "extra": 1},
        {"t": "tp_join_ok", "payload": b"x" * (MAX_TP_REPLY_PAYLOAD + 1)},
        {"t": "tp_stream", "session": "not-hex" * 5, "rank": 1},
        {"t": "tp_stream", "session": "a" * 32, "rank": 0},
    ):
        with pytest.raises(ProtocolViolation):
            decode_payload(msgpack.packb(bad, use_bin_type=True))
