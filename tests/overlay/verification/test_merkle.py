"""The chunk-hash Merkle tree (RFC 6962 §2.1) and its inclusion proofs, including tampered ones."""

from __future__ import annotations

import hashlib

import pytest

from potluck.overlay.verification import merkle


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(f"chunk {i}".encode()) for i in range(n)]


def _reference_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 MTH written as literally as the RFC states it."""
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _reference_root(leaves[:k]) + _reference_root(leaves[k:])).digest()


def test_leaf_and_empty_tree_follow_rfc6962():
    assert merkle.leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert merkle.root([]) == hashlib.sha256(b"").digest()
    one = merkle.leaf_hash(b"x")
    assert merkle.root([one]) == one


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31])
def test_every_leaf_has_a_valid_proof(n: int):
    leaves = _leaves(n)
    root = merkle.root(leaves)
    assert root == _reference_root(leaves)
    for i in range(n):
        assert merkle.verify(root, i, n, leaves[i], merkle.proof(leaves, i))


def test_rfc6962_unbalanced_split_for_seven_leaves():
    """RFC 6962 §2.1.3's example tree of 7 leaves: the audit path of d0 is [b, h, l]."""
    leaves = _leaves(7)
    a, b, c, d, e, f, j = leaves
    h = hashlib.sha256(b"\x01" + c + d).digest()
    i = hashlib.sha256(b"\x01" + e + f).digest()
    ll = hashlib.sha256(b"\x01" + i + j).digest()
    assert merkle.proof(leaves, 0) == (b, h, ll)
    assert merkle.proof(leaves, 6) == (
        i,
        hashlib.sha256(b"\x01" + hashlib.sha256(b"\x01" + a + b).digest() + h).digest(),
    )


TAMPERS = {
    "other leaf": lambda root, i, n, leaf, path: (root, i, n, merkle.leaf_hash(b"forged"), path),
    "wrong index": lambda root, i, n, leaf, path: (root, (i + 1) % n, n, leaf, path),
    # (a tree size of the same shape for this leaf proves the same thing: the size is signed in
    # the record next to the root, so only a size of another shape is a tamper case)
    "tree of another depth": lambda root, i, n, leaf, path: (root, i, 2 * n + 1, leaf, path),
    "index past the end": lambda root, i, n, leaf, path: (root, n, n, leaf, path),
    "negative index": lambda root, i, n, leaf, path: (root, -1, n, leaf, path),
    "truncated path": lambda root, i, n, leaf, path: (root, i, n, leaf, path[:-1]),
    "extended path": lambda root, i, n, leaf, path: (root, i, n, leaf, (*path, bytes(32))),
    "flipped bit in path": lambda root, i, n, leaf, path: (
        root,
        i,
        n,
        leaf,
        (bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]),
    ),
    "reversed path": lambda root, i, n, leaf, path: (root, i, n, leaf, tuple(reversed(path))),
    "short path element": lambda root, i, n, leaf, path: (root, i, n, leaf, (path[0][:31], *path[1:])),
    "other root": lambda root, i, n, leaf, path: (hashlib.sha256(b"x").digest(), i, n, leaf, path),
    "interior node as leaf": lambda root, i, n, leaf, path: (root, i // 2, n // 2, path[0], path[1:]),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
@pytest.mark.parametrize("n, i", [(9, 0), (9, 5), (9, 8), (16, 3), (13, 12)])
def test_tampered_proofs_fail(tamper: str, n: int, i: int):
    leaves = _leaves(n)
    root = merkle.root(leaves)
    honest = (root, i, n, leaves[i], merkle.proof(leaves, i))
    args = TAMPERS[tamper](*honest)
    if args == honest:
        pytest.skip("this tamper changes nothing here (a one-element path reversed)")
    assert not merkle.verify(*args)


def test_proof_of_a_missing_leaf_raises():
    with pytest.raises(IndexError):
        merkle.proof(_leaves(3), 3)


def test_n_chunks():
    assert merkle.n_chunks(0) == 0
    assert merkle.n_chunks(1) == 1
    assert merkle.n_chunks(merkle.CHUNK_SIZE) == 1
    assert merkle.n_chunks(merkle.CHUNK_SIZE + 1) == 2
