"""Chunk-hash Merkle tree of a file, with inclusion proofs (proof of possession).

The tree is RFC 6962's Merkle Tree Hash (Certificate Transparency, RFC 6962 §2.1; the same
construction in RFC 9162 §2.1.1), over the file cut into fixed chunks of :data:`CHUNK_SIZE` bytes
(the last one shorter):

* leaf ``i``: ``SHA-256(0x00 || chunk_i)``;
* an interior node: ``SHA-256(0x01 || left || right)``;
* for ``n > 1`` leaves the left subtree holds the largest power of two ``k < n`` leaves, the right
  one the rest (so the tree is unbalanced on the right, never padded);
* an empty file has root ``SHA-256(b"")``.

The 0x00/0x01 prefixes keep a leaf from ever being passed off as an interior node (second-preimage
protection). Inclusion proofs are RFC 6962's audit paths (§2.1.1) and are checked with RFC 9162
§2.1.3.2's algorithm, which also binds the proof to the leaf index and the tree size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

CHUNK_SIZE = 256 << 10  # bytes per leaf: three chunks and their proofs fit one 1 MiB RPC frame
HASH_SIZE = 32


def leaf_hash(chunk: bytes) -> bytes:
    """``SHA-256(0x00 || chunk)``: the hash of one leaf (32 bytes)."""
    return hashlib.sha256(b"\x00" + chunk).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash over leaf hashes (32 bytes each); ``SHA-256(b"")`` when empty."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(root(leaves[:k]), root(leaves[k:]))


def proof(leaves: Sequence[bytes], index: int) -> tuple[bytes, ...]:
    """Audit path of leaf ``index`` (RFC 6962 §2.1.1 ``PATH(m, D[n])``), leaf-side hash first.

    Raises:
        IndexError: ``index`` is outside ``[0, len(leaves))``.
    """
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} of a {len(leaves)}-leaf tree")
    path: list[bytes] = []
    lo, hi = 0, len(leaves)
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(root(leaves[lo + k : hi]))
            hi = lo + k
        else:
            path.append(root(leaves[lo : lo + k]))
            lo = lo + k
    return tuple(reversed(path))


def verify(root_hash: bytes, index: int, tree_size: int, leaf: bytes, path: Sequence[bytes]) -> bool:
    """Whether ``path`` proves that ``leaf`` (a leaf hash) is leaf ``index`` of the tree of
    ``tree_size`` leaves whose root is ``root_hash`` (RFC 9162 §2.1.3.2). Never raises."""
    if not 0 <= index < tree_size or any(len(p) != HASH_SIZE for p in path):
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root_hash


def n_chunks(size: int) -> int:
    """Leaves of a file of ``size`` bytes (0 for an empty file)."""
    return -(-size // CHUNK_SIZE)
