"""Content-addressed shard transfer over a :class:`~potluck.sharding.collective.channel.FrameChannel`.

A shard file is cut into fixed-size chunks (default 4 MiB), each named by its SHA-256. The
:class:`Manifest` (ordered chunk hashes, total size, chunk size, SHA-256 of the whole file) travels
first; the receiver then asks for the chunks it lacks, a few in flight at once, checks every chunk
against its name before writing it, and finally checks the whole file's hash before moving it into
place. This is the scheme of BitTorrent v2 / IPFS block transfer reduced to one sender.

Cache layout, keyed by (model hash, plan hash)::

    <cache_root>/<model_hash>/<plan_hash>/shard.bin       verified shard, moved into place atomically
                                          manifest.msgpack its manifest
                                          shard.part      partial download; resumed chunk by chunk

Resuming needs no journal: the chunks of ``shard.part`` that already hash to their names are kept,
the rest are fetched (identical chunks once). A bad chunk is rejected with
:class:`~potluck.errors.ProtocolViolation` and never written; the verified ones stay for the next try.

Conversation (receiver = initiator)::

    MANIFEST_REQ {"model", "plan"}  ->  MANIFEST {manifest} | REFUSED {"reason"}
    CHUNK_REQ {"index"}             ->  CHUNK {"index"} + bytes
    DONE                            ->  (the sender's serve loop returns)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from potluck.errors import PeerRefused, ProtocolViolation, TransferError
from potluck.sharding.collective.channel import FrameChannel
from potluck.sharding.collective.frames import Kind

__all__ = ["CHUNK_BYTES", "Manifest", "build_manifest", "cache_dir", "fetch_shard", "serve_shards"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024
MIN_CHUNK_BYTES = 4 * 1024
MAX_CHUNK_BYTES = 32 * 1024 * 1024
MAX_SHARD_BYTES = 1 << 40  # 1 TiB
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[0-9A-Za-z._-]{1,128}")
_READ_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a shard file is made of.

    Attributes:
        file_sha256: hex SHA-256 of the whole file.
        total_size: file size in bytes.
        chunk_size: bytes per chunk (the last one may be shorter).
        chunks: hex SHA-256 of each chunk, in file order.
    """

    file_sha256: str
    total_size: int
    chunk_size: int
    chunks: tuple[str, ...]

    def chunk_len(self, index: int) -> int:
        """Length in bytes of chunk ``index``."""
        return min(self.chunk_size, self.total_size - index * self.chunk_size)

    def to_wire(self) -> dict[str, Any]:
        return {
            "file_sha256": self.file_sha256,
            "total_size": self.total_size,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Manifest:
        """Validate a manifest received from a peer (unknown or missing fields refused).

        Raises:
            ProtocolViolation: naming the bad field.
        """
        if set(data) != {"file_sha256", "total_size", "chunk_size", "chunks"}:
            raise ProtocolViolation(f"manifest fields {sorted(data)} are not the expected four")
        total, size, chunks = data["total_size"], data["chunk_size"], data["chunks"]
        if not isinstance(total, int) or isinstance(total, bool) or not 0 <= total <= MAX_SHARD_BYTES:
            raise ProtocolViolation(f"manifest total_size {total!r} is out of range")
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_CHUNK_BYTES <= size <= MAX_CHUNK_BYTES:
            raise ProtocolViolation(f"manifest chunk_size {size!r} is out of range")
        if not isinstance(chunks, list) or len(chunks) != math.ceil(total / size):
            raise ProtocolViolation(
                f"manifest lists {len(chunks) if isinstance(chunks, list) else '?'} chunks "
                f"for {total} bytes in chunks of {size}"
            )
        for digest in [data["file_sha256"], *chunks]:
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ProtocolViolation(f"manifest digest {digest!r} is not 64 lowercase hex digits")
        return cls(data["file_sha256"], total, size, tuple(chunks))


def build_manifest(path: Path, chunk_size: int = CHUNK_BYTES) -> Manifest:
    """Hash ``path`` chunk by chunk.

    Raises:
        ValueError: chunk_size out of range.
        OSError: the file cannot be read.
    """
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    whole = hashlib.sha256()
    chunks = []
    total = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            total += len(block)
    return Manifest(whole.hexdigest(), total, chunk_size, tuple(chunks))


def cache_dir(cache_root: Path, model_hash: str, plan_hash: str) -> Path:
    """``cache_root/model_hash/plan_hash``; both names must be plain (no path separators).

    Raises:
        ValueError: a name that could escape the cache directory.
    """
    for name in (model_hash, plan_hash):
        if not _NAME.fullmatch(name) or name in {".", ".."}:
            raise ValueError(f"{name!r} is not a valid cache key")
    return cache_root / model_hash / plan_hash


# -- sender ------------------------------------------------------------------------------------------


def serve_shards(
    channel: FrameChannel,
    shards: Mapping[tuple[str, str], tuple[Path, Manifest]],
    *,
    timeout_s: float = 30.0,
) -> int:
    """Answer one receiver's manifest and chunk requests until it says DONE.

    Args:
        channel: authenticated channel to the receiver.
        shards: (model hash, plan hash) -> (shard file, its manifest from :func:`build_manifest`).
        timeout_s: deadline for each request to arrive and its answer to go out, in seconds.

    Returns:
        The number of chunks sent.

    Raises:
        ProtocolViolation: the receiver sent a malformed or out-of-range request.
        TransferError: the receiver went away or stalled.
    """
    served = 0
    source: _Source | None = None
    try:
        while True:
            frame = channel.recv(deadline=time.monotonic() + timeout_s)
            deadline = time.monotonic() + timeout_s
            if frame.kind is Kind.DONE:
                return served
            if frame.kind is Kind.MANIFEST_REQ:
                if source is not None:
                    source.close()
                source = _open_source(channel, shards, frame.header, deadline)
            elif frame.kind is Kind.CHUNK_REQ and source is not None:
                index = frame.header.get("index")
                if not isinstance(index, int) or not 0 <= index < len(source.manifest.chunks):
                    raise ProtocolViolation(f"chunk request {frame.header!r} is out of range")
                channel.send(Kind.CHUNK, {"index": index}, source.read(index), deadline=deadline)
                served += 1
            else:
                raise ProtocolViolation(f"unexpected {frame.kind.name} frame in a shard transfer")
    finally:
        if source is not None:
            source.close()


class _Source:
    """An open shard file being served: chunks are read into one reused buffer."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.manifest = manifest
        self._fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        if size != manifest.total_size:
            os.close(self._fd)
            raise OSError(f"{path} is {size} bytes, its manifest says {manifest.total_size}")
        self._buf = np.empty(min(manifest.chunk_size, manifest.total_size), np.uint8)

    def read(self, index: int) -> np.ndarray:
        """Chunk ``index`` as a uint8 view of the reused buffer (valid until the next read)."""
        length = self.manifest.chunk_len(index)
        view = self._buf[:length]
        if os.preadv(self._fd, [view.data], index * self.manifest.chunk_size) != length:
            raise OSError("shard file shrank while it was being served")
        return view

    def close(self) -> None:
        os.close(self._fd)


def _open_source(
    channel: FrameChannel,
    shards: Mapping[tuple[str, str], tuple[Path, Manifest]],
    header: dict[str, Any],
    deadline: float,
) -> _Source | None:
    """Answer a MANIFEST_REQ: MANIFEST and the opened source, or REFUSED and None."""
    model, plan = header.get("model"), header.get("plan")
    if not isinstance(model, str) or not isinstance(plan, str) or (model, plan) not in shards:
        channel.send(Kind.REFUSED, {"reason": f"no shard for {model!r}/{plan!r}"}, deadline=deadline)
        return None
    path, manifest = shards[model, plan]
    try:
        source = _Source(path, manifest)
    except OSError as exc:
        log.warning("cannot serve shard %s: %s", path, exc)
        channel.send(Kind.REFUSED, {"reason": "shard file unavailable"}, deadline=deadline)
        return None
    channel.send(Kind.MANIFEST, manifest.to_wire(), deadline=deadline)
    return source


# -- receiver ----------------------------------------------------------------------------------------


def fetch_shard(
    channel: FrameChannel,
    model_hash: str,
    plan_hash: str,
    cache_root: Path,
    *,
    expect_sha256: str | None = None,
    timeout_s: float = 30.0,
    window: int = 4,
) -> Path:
    """Fetch (or find in the cache) the shard for (model hash, plan hash) and return its path.

    Args:
        channel: authenticated channel to the sender (which runs :func:`serve_shards`).
        model_hash, plan_hash: cache key; plain names (see :func:`cache_dir`).
        cache_root: root of the shard cache.
        expect_sha256: if given, the manifest must name this file hash (pins the content).
        timeout_s: deadline of each request/answer, in seconds.
        window: chunk requests kept in flight (hides the round trip per chunk).

    Returns:
        Path of the verified ``shard.bin``.

    Raises:
        PeerRefused: the sender has no such shard.
        ProtocolViolation: bad manifest, a chunk whose hash does not match its name, or a whole-file
            hash mismatch. Verified chunks stay in ``shard.part`` for the next attempt; the
            conversation is out of step, so the caller closes the channel.
        TransferError: the sender went away or stalled.
    """
    folder = cache_dir(cache_root, model_hash, plan_hash)
    folder.mkdir(parents=True, exist_ok=True)
    channel.send(Kind.MANIFEST_REQ, {"model": model_hash, "plan": plan_hash}, deadline=time.monotonic() + timeout_s)
    frame = channel.recv(deadline=time.monotonic() + timeout_s)
    if frame.kind is Kind.REFUSED:
        channel.send(Kind.DONE, None, deadline=time.monotonic() + timeout_s)
        raise PeerRefused(f"{channel.peer} has no shard: {frame.header.get('reason')}")
    if frame.kind is not Kind.MANIFEST:
        raise ProtocolViolation(f"expected a MANIFEST frame, got {frame.kind.name}")
    manifest = Manifest.from_wire(frame.header)
    if expect_sha256 is not None and manifest.file_sha256 != expect_sha256:
        raise ProtocolViolation(f"manifest names file {manifest.file_sha256}, expected {expect_sha256}")
    final = folder / "shard.bin"
    if _cached(folder, manifest):
        log.info("shard %s/%s is cached at %s", model_hash, plan_hash, final)
    else:
        _download(channel, manifest, folder / "shard.part", timeout_s, window)
        (folder / "shard.part").replace(final)
        (folder / "manifest.msgpack").write_bytes(msgpack.packb(manifest.to_wire()))
    channel.send(Kind.DONE, None, deadline=time.monotonic() + timeout_s)
    return final


def _cached(folder: Path, manifest: Manifest) -> bool:
    """The verified shard.bin is there and its stored manifest is this one."""
    final, stored = folder / "shard.bin", folder / "manifest.msgpack"
    if not (final.is_file() and stored.is_file()):
        return False
    try:
        previous = Manifest.from_wire(msgpack.unpackb(stored.read_bytes()))
    except (ProtocolViolation, ValueError, msgpack.UnpackException) as exc:
        log.warning("ignoring unreadable cached manifest %s: %s", stored, exc)
        return False
    return previous == manifest and final.stat().st_size == manifest.total_size


def _download(channel: FrameChannel, manifest: Manifest, part: Path, timeout_s: float, window: int) -> None:
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        had = os.fstat(fd).st_size
        os.ftruncate(fd, manifest.total_size)
        missing: dict[str, list[int]] = {}  # chunk hash -> positions still to fill
        for index, digest in enumerate(manifest.chunks):
            end = index * manifest.chunk_size + manifest.chunk_len(index)
            if end <= had and _hash_at(fd, manifest, index) == digest:
                continue
            missing.setdefault(digest, []).append(index)
        log.info("shard transfer: %d of %d chunks to fetch", len(missing), len(manifest.chunks))
        _fetch_chunks(channel, manifest, fd, missing, timeout_s, window)
        os.fsync(fd)
        whole = _hash_file(fd, manifest.total_size)
        if whole != manifest.file_sha256:
            raise ProtocolViolation(f"assembled shard hashes to {whole}, manifest says {manifest.file_sha256}")
    finally:
        os.close(fd)


def _fetch_chunks(
    channel: FrameChannel,
    manifest: Manifest,
    fd: int,
    missing: dict[str, list[int]],
    timeout_s: float,
    window: int,
) -> None:
    todo = deque(positions[0] for positions in missing.values())
    in_flight: deque[int] = deque()
    while todo or in_flight:
        while todo and len(in_flight) < max(1, window):
            index = todo.popleft()
            channel.send(Kind.CHUNK_REQ, {"index": index}, deadline=time.monotonic() + timeout_s)
            in_flight.append(index)
        index = in_flight.popleft()
        frame = channel.recv(deadline=time.monotonic() + timeout_s)
        if frame.kind is not Kind.CHUNK or frame.header.get("index") != index or frame.array is None:
            raise ProtocolViolation(f"expected CHUNK {index}, got {frame.kind.name} {frame.header!r}")
        data = frame.array
        if data.nbytes != manifest.chunk_len(index):
            raise ProtocolViolation(f"chunk {index} is {data.nbytes} bytes, expected {manifest.chunk_len(index)}")
        digest = hashlib.sha256(data.data).hexdigest()
        if digest != manifest.chunks[index]:
            raise ProtocolViolation(f"chunk {index} hashes to {digest}, its name is {manifest.chunks[index]}")
        for position in missing[digest]:
            os.pwrite(fd, data.data, position * manifest.chunk_size)


def _hash_at(fd: int, manifest: Manifest, index: int) -> str:
    data = os.pread(fd, manifest.chunk_len(index), index * manifest.chunk_size)
    return hashlib.sha256(data).hexdigest()


def _hash_file(fd: int, size: int) -> str:
    whole = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(_READ_BYTES, size - offset), offset)
        if not block:
            raise TransferError("shard.part shrank while it was being verified")
        whole.update(block)
        offset += len(block)
    return whole.hexdigest()
