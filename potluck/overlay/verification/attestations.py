"""Signed attestations: one node's verdict on a peer's serving of a model.

An attestation is carried in its attester's own signed cluster-state record (a bounded list,
:data:`MAX_ATTESTATIONS`), so it travels with the CRDT (gossip and anti-entropy) and expires with
the record. It is also signed on its own, with the attester's Ed25519 key over
``"potluck-attestation/1\\0" || msgpack(fields without sig)``, so it can be checked apart from the
record that carries it. :func:`problem` is what the cluster state runs on every attestation of
every record it receives: a record carrying an attestation that is not signed by that record's
peer is rejected as ``forged`` and counted like any other forged record.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field

from potluck.identity import NodeIdentity, verify

MAX_ATTESTATIONS = 12  # per record (about 5.5 KiB of the 16 KiB record limit at most)
_SIG_CONTEXT = b"potluck-attestation/1\x00"
_HEX64 = r"^[0-9a-f]{64}$"

Method = Literal["logprob", "majority", "possession"]
Verdict = Literal["pass", "fail"]


class Attestation(BaseModel):
    """A signed verdict. Times are Unix seconds.

    Attributes:
        attester: peer ID of the signer (the node that ran the check).
        subject: peer ID of the checked peer.
        model_sha256: hex SHA-256 of the GGUF the subject advertises.
        method: ``logprob`` (checked against the attester's own copy of the model), ``majority``
            (the subject's answer against other holders'), ``possession`` (Merkle proofs of chunks).
        verdict: ``pass`` or ``fail``.
        at: when the check finished.
        nonce: the challenge's nonce (16 bytes), so a verdict names one challenge.
        detail: why, in words (shown in the cluster view).
        sig: Ed25519 signature (64 bytes) by ``attester``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    attester: str = Field(min_length=1, max_length=128)
    subject: str = Field(min_length=1, max_length=128)
    model_sha256: str = Field(pattern=_HEX64)
    method: Method
    verdict: Verdict
    at: float = Field(ge=0.0)
    nonce: bytes = Field(min_length=16, max_length=16)
    detail: str = Field("", max_length=120)
    sig: bytes = Field(min_length=64, max_length=64)


def _body(a: Attestation) -> bytes:
    fields = a.model_dump(mode="python", exclude={"sig"})
    return _SIG_CONTEXT + msgpack.packb(fields, use_bin_type=True)


def sign(
    identity: NodeIdentity,
    subject: str,
    model_sha256: str,
    method: Method,
    verdict: Verdict,
    nonce: bytes | None = None,
    detail: str = "",
    at: float | None = None,
) -> Attestation:
    """A new attestation by ``identity`` (``nonce``: the challenge's, a fresh one when ``None``)."""
    unsigned = Attestation(
        attester=identity.peer_id,
        subject=subject,
        model_sha256=model_sha256,
        method=method,
        verdict=verdict,
        at=time.time() if at is None else at,
        nonce=nonce if nonce is not None else os.urandom(16),
        detail=detail[:120],
        sig=bytes(64),
    )
    return unsigned.model_copy(update={"sig": identity.sign(_body(unsigned))})


def problem(a: Attestation, carrier: str) -> str | None:
    """Why attestation ``a``, found in ``carrier``'s record, is not acceptable; ``None`` when it is.

    It must be signed by its attester, and the attester must be the record's own peer (a node
    publishes only its own verdicts).
    """
    if a.attester != carrier:
        return f"attestation by {a.attester} inside the record of {carrier}"
    if not verify(a.attester, _body(a), a.sig):
        return f"attestation on {a.subject} has a bad signature"
    return None
