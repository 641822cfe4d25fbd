"""A model file's content address: the fixture's known SHA-256, the on-disk cache and its stamps."""

from __future__ import annotations

import os
import shutil

from potluck.overlay.verification import merkle
from potluck.overlay.verification.fileid import file_identity, hash_file, load_cached


def test_identity_of_a_fixture_matches_its_published_checksum(model_path, shared_dir):
    path = model_path("q4_0")
    sums = dict(reversed(line.split()) for line in (shared_dir / "models" / "SHA256SUMS").read_text().splitlines())
    ident = hash_file(path)
    assert ident.sha256 == sums[path.name]
    assert len(ident.leaves) == merkle.n_chunks(path.stat().st_size)
    assert ident.merkle_root == merkle.root(ident.leaves).hex()
    i = len(ident.leaves) - 1
    chunk = ident.read_chunk(i)
    assert merkle.verify(
        bytes.fromhex(ident.merkle_root), i, len(ident.leaves), merkle.leaf_hash(chunk), ident.proof(i)
    )


def test_cache_is_used_until_the_file_changes(tmp_path, model_path):
    path = tmp_path / "m.gguf"
    shutil.copy(model_path("q4_0"), path)
    data = tmp_path / "data"
    first = file_identity(data, path)
    assert load_cached(data, path) == first
    with path.open("r+b") as f:  # same size, other bytes, later mtime
        f.seek(100)
        f.write(b"\xff")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert load_cached(data, path) is None
    assert file_identity(data, path).sha256 != first.sha256
