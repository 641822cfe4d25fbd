"""Proofs for potluck's mutual challenge/response handshakes (HMAC-SHA256, RFC 2104).

Two protocols authenticate peers by proving knowledge of a shared key over fresh nonces, in the
ISO/IEC 9798-4 style: swarm admission (:mod:`potluck.overlay.admission`, key from the swarm secret)
and the tensor-parallel data plane (:mod:`potluck.sharding.collective.auth`, a per-session key).
Their message flows differ; the proof and its check are here, written once::

    proof = HMAC-SHA256(K, enc(label) | enc(field_1) | ... | enc(field_n))
    enc(x) = len(x) as 4 bytes, big-endian | x

Every protocol, and every direction of a protocol that tells them apart, has its own
:class:`Label` (domain separation): with each part length-prefixed, a proof made under one label
and list of fields never serves under another label or another split of the fields, short of an
HMAC-SHA256 collision. Which fields a proof binds (nonces, peer identities, direction) is each
protocol's choice and documented there. Proofs are checked in constant time
(:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum

__all__ = ["MAC_BYTES", "NONCE_BYTES", "Label", "new_nonce", "prove", "verify"]

NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size


class Label(bytes, Enum):
    """The domain-separation label of each proof potluck makes (one per protocol and role)."""

    #: swarm admission, either direction (the proof binds prover and verifier peer IDs).
    ADMIT = b"potluck/admit/2"
    #: tensor-parallel channel handshake: the responder's proof (master, or shard sender).
    TP_RESPONDER = b"potluck/sharding/auth/v2/responder"
    #: tensor-parallel channel handshake: the initiator's proof (worker, or shard receiver).
    TP_INITIATOR = b"potluck/sharding/auth/v2/initiator"


def new_nonce() -> bytes:
    """A fresh random challenge of :data:`NONCE_BYTES` bytes (``secrets.token_bytes``)."""
    return secrets.token_bytes(NONCE_BYTES)


def _message(label: Label, fields: tuple[bytes, ...]) -> bytes:
    return b"".join(len(part).to_bytes(4, "big") + part for part in (label.value, *fields))


def prove(key: bytes, label: Label, *fields: bytes) -> bytes:
    """The proof of knowing ``key`` over ``fields``, under ``label``.

    Args:
        key: the shared secret key (any length; HMAC hashes longer ones).
        label: the protocol and role making the proof.
        fields: what the proof binds, in the protocol's order (nonces, identities...).

    Returns:
        :data:`MAC_BYTES` bytes.
    """
    return hmac.new(key, _message(label, fields), hashlib.sha256).digest()


def verify(key: bytes, label: Label, proof: object, *fields: bytes) -> bool:
    """Whether ``proof`` is :func:`prove` ``(key, label, *fields)``, compared in constant time.

    ``proof`` as received (any type): anything but bytes of the right value is ``False``.
    """
    return isinstance(proof, bytes) and hmac.compare_digest(proof, prove(key, label, *fields))
