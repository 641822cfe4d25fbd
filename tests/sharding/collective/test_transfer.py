"""Content-addressed shard transfer over authenticated TCP channels on 127.0.0.1."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from potluck.errors import PeerRefused, ProtocolViolation
from potluck.sharding.collective import auth
from potluck.sharding.collective.channel import FrameChannel, SocketStream, configure_socket
from potluck.sharding.collective.star import StarMaster, StarWorker
from potluck.sharding.collective.transfer import Manifest, build_manifest, cache_dir, fetch_shard, serve_shards

KEY = bytes(range(32))
CHUNK = 64 * 1024


@contextmanager
def authenticated_pair() -> Iterator[tuple[FrameChannel, FrameChannel]]:
    """(sender, receiver) channels over a real TCP connection, after the mutual handshake."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        configure_socket(sock)
    sender, receiver = FrameChannel(SocketStream(server)), FrameChannel(SocketStream(client))
    deadline = time.monotonic() + 10
    thread = threading.Thread(
        target=auth.initiate, args=(receiver, KEY, {"role": "shard"}), kwargs={"deadline": deadline}
    )
    thread.start()
    auth.respond(sender, KEY, lambda hello: None, deadline=deadline)
    thread.join()
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


class Sender(threading.Thread):
    """Runs :func:`serve_shards` and records what it returned or raised."""

    def __init__(self, channel: FrameChannel, shards: dict[tuple[str, str], tuple[Path, Manifest]]) -> None:
        super().__init__(daemon=True)
        self.channel, self.shards = channel, shards
        self.served: int | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.served = serve_shards(self.channel, self.shards, timeout_s=10)
        except BaseException as exc:  # recorded for the test
            self.error = exc

    def finish(self) -> None:
        self.join(timeout=30)
        assert not self.is_alive()


def fetch(shards: dict[tuple[str, str], tuple[Path, Manifest]], cache: Path, **kw: Any) -> tuple[Path, Sender]:
    with authenticated_pair() as (sender_channel, receiver_channel):
        sender = Sender(sender_channel, shards)
        try:
            path = fetch_shard(receiver_channel, "model-a", "plan-1", cache, timeout_s=10, **kw)
        finally:
            receiver_channel.close()
            sender.finish()
    return path, sender


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Path, Manifest]:
    path = tmp_path / "source.shard"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 10 * CHUNK + 1234, dtype=np.uint8).tobytes())
    return path, build_manifest(path, CHUNK)


def test_fetch_then_cache_hit(tmp_path: Path, shard: tuple[Path, Manifest]) -> None:
    source, manifest = shard
    assert len(manifest.chunks) == 11 and manifest.chunk_len(10) == 1234
    assert manifest.file_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    shards = {("model-a", "plan-1"): shard}
    path, sender = fetch(shards, tmp_path / "cache", expect_sha256=manifest.file_sha256)
    assert path == cache_dir(tmp_path / "cache", "model-a", "plan-1") / "shard.bin"
    assert path.read_bytes() == source.read_bytes()
    assert sender.error is None and sender.served == 11
    again, sender = fetch(shards, tmp_path / "cache")
    assert again == path and sender.error is None and sender.served == 0


def test_resume_fetches_only_missing_chunks(tmp_path: Path, shard: tuple[Path, Manifest]) -> None:
    source, _ = shard
    folder = cache_dir(tmp_path / "cache", "model-a", "plan-1")
    folder.mkdir(parents=True)
    data = source.read_bytes()
    # An interrupted download: chunks 0..3 arrived, chunk 4 half written and damaged.
    (folder / "shard.part").write_bytes(data[: 4 * CHUNK] + b"\xff" * (CHUNK // 2))
    path, sender = fetch({("model-a", "plan-1"): shard}, tmp_path / "cache")
    assert path.read_bytes() == data and sender.served == 7


def test_identical_chunks_are_fetched_once(tmp_path: Path) -> None:
    source = tmp_path / "zeros.shard"
    source.write_bytes(bytes(6 * CHUNK) + b"tail")
    manifest = build_manifest(source, CHUNK)
    path, sender = fetch({("model-a", "plan-1"): (source, manifest)}, tmp_path / "cache")
    assert path.read_bytes() == source.read_bytes() and sender.served == 2


def test_bad_chunk_is_rejected_and_good_ones_are_kept(tmp_path: Path, shard: tuple[Path, Manifest]) -> None:
    source, manifest = shard
    data = bytearray(source.read_bytes())
    data[2 * CHUNK + 7] ^= 0x01  # one flipped bit in chunk 2
    forged = tmp_path / "forged.shard"
    forged.write_bytes(bytes(data))
    with pytest.raises(ProtocolViolation, match=r"chunk 2 hashes to [0-9a-f]{64}, its name is"):
        fetch({("model-a", "plan-1"): (forged, manifest)}, tmp_path / "cache", window=1)
    folder = cache_dir(tmp_path / "cache", "model-a", "plan-1")
    assert not (folder / "shard.bin").exists()
    part = (folder / "shard.part").read_bytes()
    assert part[: 2 * CHUNK] == source.read_bytes()[: 2 * CHUNK]
    assert part[2 * CHUNK : 3 * CHUNK] != bytes(data[2 * CHUNK : 3 * CHUNK])  # never written
    path, sender = fetch({("model-a", "plan-1"): shard}, tmp_path / "cache")
    assert path.read_bytes() == source.read_bytes() and sender.served == 9


def test_unknown_shard_is_refused(tmp_path: Path, shard: tuple[Path, Manifest]) -> None:
    with pytest.raises(PeerRefused, match="no shard"):
        fetch({("model-b", "plan-1"): shard}, tmp_path / "cache")


def test_pinned_hash_mismatch_is_refused(tmp_path: Path, shard: tuple[Path, Manifest]) -> None:
    with pytest.raises(ProtocolViolation, match="manifest names file"):
        fetch({("model-a", "plan-1"): shard}, tmp_path / "cache", expect_sha256="0" * 64)


def test_empty_shard(tmp_path: Path) -> None:
    source = tmp_path / "empty.shard"
    source.write_bytes(b"")
    path, sender = fetch({("model-a", "plan-1"): (source, build_manifest(source, CHUNK))}, tmp_path / "c")
    assert path.read_bytes() == b"" and sender.served == 0


def test_transfer_over_the_star_connection_then_all_reduce(tmp_path: Path, shard: tuple[Path, Manifest]) -> None:
    """The worker fetches its shard over its authenticated star channel; the collective still works."""
    master = StarMaster(2, KEY, timeout_s=10)
    out: dict[str, Any] = {}

    def worker_main() -> None:
        with StarWorker.connect(master.address, 1, 2, KEY, timeout_s=10) as worker:
            out["path"] = fetch_shard(worker.channel, "model-a", "plan-1", tmp_path / "cache")
            out["sum"] = worker.all_reduce(np.ones(8, np.float32))

    thread = threading.Thread(target=worker_main)
    thread.start()
    try:
        master.accept_workers(timeout_s=20)
        served = serve_shards(master.channel(1), {("model-a", "plan-1"): shard}, timeout_s=10)
        total = master.all_reduce(np.full(8, 2, np.float32))
    finally:
        master.close()
        thread.join(timeout=30)
    assert served == 11 and out["path"].read_bytes() == shard[0].read_bytes()
    assert np.array_equal(total, np.full(8, 3, np.float32)) and np.array_equal(out["sum"], total)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "not the expected four"),
        ({"total_size": -1}, "total_size"),
        ({"chunk_size": 10}, "chunk_size"),
        ({"chunks": ["a" * 64]}, "lists 1 chunks"),
        ({"file_sha256": "Z" * 64}, "not 64 lowercase hex"),
        ({"total_size": True}, "total_size"),
    ],
)
def test_manifest_validation(shard: tuple[Path, Manifest], change: dict[str, Any], message: str) -> None:
    wire = {**shard[1].to_wire(), **change}
    with pytest.raises(ProtocolViolation, match=message):
        Manifest.from_wire(wire)


def test_manifest_round_trip(shard: tuple[Path, Manifest]) -> None:
    assert Manifest.from_wire(shard[1].to_wire()) == shard[1]


@pytest.mark.parametrize("bad", ["..", "a/b", "", "x" * 200, "a\x00"])
def test_cache_keys_cannot_escape(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid cache key"):
        cache_dir(tmp_path, bad, "plan")
