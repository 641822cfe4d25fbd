"""A model file's content address: its SHA-256 and its chunk-hash Merkle root, cached on disk.

Both come from one read of the file (:data:`~potluck.overlay.verification.merkle.CHUNK_SIZE`
chunks). Reading a multi-gigabyte GGUF takes seconds, so the result is cached in the data dir
under ``model-ids/``, keyed by the file's absolute path, size and modification time (ns): a
restart with an unchanged file reads only the cache. The leaf hashes are cached too, because
answering a proof-of-possession request needs the audit paths (32 bytes per 256 KiB chunk:
128 KiB for a 1 GiB model).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from potluck.overlay.verification import merkle

log = logging.getLogger(__name__)

CACHE_DIR = "model-ids"


@dataclass(frozen=True)
class FileIdentity:
    """What a model file is, by content.

    Attributes:
        path: the file.
        size: bytes.
        sha256: hex SHA-256 of the whole file (64 characters).
        merkle_root: hex RFC 6962 root over its chunks (:mod:`~potluck.overlay.verification.merkle`).
        leaves: the leaf hashes (32 bytes each, one per chunk).
    """

    path: Path
    size: int
    sha256: str
    merkle_root: str
    leaves: tuple[bytes, ...]

    def read_chunk(self, index: int) -> bytes:
        """Chunk ``index`` of the file as it is on disk now.

        Raises:
            IndexError: no such chunk. OSError: the file cannot be read.
        """
        if not 0 <= index < len(self.leaves):
            raise IndexError(f"chunk {index} of {len(self.leaves)}")
        with self.path.open("rb") as f:
            f.seek(index * merkle.CHUNK_SIZE)
            return f.read(merkle.CHUNK_SIZE)

    def proof(self, index: int) -> tuple[bytes, ...]:
        """Audit path of chunk ``index`` (see :func:`merkle.proof`)."""
        return merkle.proof(self.leaves, index)


def hash_file(path: Path) -> FileIdentity:
    """Read ``path`` once: SHA-256 and chunk leaf hashes. Blocking (run it in a thread).

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    leaves: list[bytes] = []
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(merkle.CHUNK_SIZE):
            digest.update(chunk)
            leaves.append(merkle.leaf_hash(chunk))
            size += len(chunk)
    return FileIdentity(path, size, digest.hexdigest(), merkle.root(leaves).hex(), tuple(leaves))


def _cache_file(data_dir: Path, path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return data_dir / CACHE_DIR / f"{key}.json"


def _stamp(path: Path) -> dict[str, object]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_cached(data_dir: Path, path: Path, ident: FileIdentity) -> None:
    """Write ``ident`` as the cached identity of ``path``, stamped with the file's size and mtime
    now (the identity's own size is kept apart: the cache is what this node will advertise)."""
    entry = _stamp(path) | {
        "content_size": ident.size,
        "sha256": ident.sha256,
        "merkle_root": ident.merkle_root,
        "leaves": base64.b64encode(b"".join(ident.leaves)).decode(),
    }
    target = _cache_file(data_dir, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, target)


def load_cached(data_dir: Path, path: Path) -> FileIdentity | None:
    """The cached identity of ``path`` when its size and mtime still match, else ``None``."""
    target = _cache_file(data_dir, path)
    try:
        entry = json.loads(target.read_text())
        if {k: entry.get(k) for k in ("path", "size", "mtime_ns")} != _stamp(path):
            return None
        blob = base64.b64decode(entry["leaves"], validate=True)
        leaves = tuple(blob[i : i + merkle.HASH_SIZE] for i in range(0, len(blob), merkle.HASH_SIZE))
        size = int(entry["content_size"])
        if len(leaves) != merkle.n_chunks(size) or merkle.root(leaves).hex() != entry["merkle_root"]:
            return None
        return FileIdentity(path, size, str(entry["sha256"]), str(entry["merkle_root"]), leaves)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("no usable model-id cache for %s: %s", path, exc)
        return None


def file_identity(data_dir: Path, path: Path) -> FileIdentity:
    """The identity of ``path``: from the cache when the file is unchanged, else hashed and cached.
    Blocking (run it in a thread).

    Raises:
        OSError: the file cannot be read.
    """
    cached = load_cached(data_dir, path)
    if cached is not None:
        return cached
    ident = hash_file(path)
    try:
        save_cached(data_dir, path, ident)
    except OSError as exc:
        log.warning("cannot cache the identity of %s: %s", path, exc)
    log.info("model %s: sha256 %s, %d chunks", path.name, ident.sha256, len(ident.leaves))
    return ident
