"""Cluster state: a state-based CRDT mapping peer ID -> the latest signed record of that peer.

Each :class:`PeerRecord` is written only by the peer it describes and signed with its Ed25519 key
(the key embedded in its peer ID). The view is a map whose merge keeps, per peer, the valid record
with the highest sequence number (ties between different records of the same sequence broken by
the larger signed byte string, so every replica picks the same one). That is the join of a
per-key max-register, hence commutative, associative and idempotent (Shapiro et al., "A
comprehensive study of Convergent and Commutative Replicated Data Types", INRIA RR-7506, 2011,
§3.2 state-based objects; a map of LWW registers keyed by writer). Liveness comes from expiry, not
tombstones: a record past its ``expires_at`` is dropped from the view, and a live peer re-issues a
record with a higher sequence number before its previous one expires.

Records are rejected (and counted) when they are oversized, malformed, unsigned, forged (bad
signature, a signer that is not the described peer, or an attestation inside it not signed by
that peer), expired, too far in the future, from
another swarm, or stale (not newer than what the view holds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from potluck.identity import NodeIdentity, PeerId, Tier, verify
from potluck.overlay.swarm_metrics import OverlayMetrics
from potluck.overlay.verification.attestations import MAX_ATTESTATIONS, Attestation
from potluck.overlay.verification.attestations import problem as attestation_problem

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 16 << 10
MAX_TTL_S = 600.0  # a record may not claim to live longer than this
CLOCK_SKEW_S = 30.0
_SIG_CONTEXT = b"potluck-record/1\x00"

RejectReason = Literal["oversized", "malformed", "unsigned", "forged", "expired", "foreign_swarm", "stale"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ModelAd(_Strict):
    """A model a peer serves."""

    id: str = Field(min_length=1, max_length=256)
    quantization: str = Field(max_length=32)
    n_ctx: int = Field(ge=0, le=1 << 24)
    n_layers: int = Field(ge=0, le=4096)
    n_params: int = Field(ge=0, le=1 << 50)
    # Content address (issue 14): the GGUF's SHA-256 and the RFC 6962 root over its 256 KiB chunks
    # (potluck.overlay.verification.merkle); None while the node is still hashing, or no file.
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    merkle_root: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(default=0, ge=0, le=1 << 50)


class Hardware(_Strict):
    """Memory in bytes, decode speed in tokens/s (measured on the peer's own model, 0 if unknown),
    bandwidths in bytes/s (measured at start: resident weight streaming and cold disk reads, what a
    tensor-parallel planner predicts ms/token from; 0 if unknown)."""

    ram_total: int = Field(ge=0, le=1 << 50)
    ram_free: int = Field(ge=0, le=1 << 50)
    cores: int = Field(ge=0, le=1 << 16)
    decode_tps: float = Field(ge=0.0, le=1e7)
    memory_budget: int = Field(default=0, ge=0, le=1 << 50)  # for a TP rank's weights (0: not set)
    memory_bw: float = Field(default=0.0, ge=0.0, le=1e13)
    disk_bw: float = Field(default=0.0, ge=0.0, le=1e13)


class Load(_Strict):
    queue_depth: int = Field(ge=0, le=1 << 20)
    active: int = Field(ge=0, le=1 << 20)


def _wire_tier(value: object) -> object:
    """A tier on the wire is an exact int 0..3 (no bool, float or string, as everywhere in a record)."""
    return Tier(value) if type(value) is int else value


WireTier = Annotated[Tier, BeforeValidator(_wire_tier)]


class PeerRecord(_Strict):
    """What a peer says about itself. Times are Unix seconds.

    ``trust_tier`` is the tier the peer *announces* for itself (see
    :func:`potluck.overlay.admission.announced_tier`): a claim, never trusted. Every node places
    its peers with its own policy, :meth:`potluck.overlay.admission.Admission.trust_tier`.
    """

    peer_id: str = Field(min_length=1, max_length=128)
    swarm: str = Field(max_length=128)
    addrs: tuple[Annotated[str, Field(max_length=256)], ...] = Field((), max_length=32)
    models: tuple[ModelAd, ...] = Field((), max_length=64)
    hardware: Hardware
    load: Load
    trust_tier: WireTier = Tier.COMMUNITY
    version: str = Field(max_length=64)
    seq: int = Field(ge=0, lt=1 << 63)
    expires_at: float = Field(ge=0.0)
    # This peer's own signed verdicts on other peers (potluck.overlay.verification.attestations).
    attestations: tuple[Attestation, ...] = Field((), max_length=MAX_ATTESTATIONS)


@dataclass(frozen=True)
class SignedRecord:
    """A record with its wire form (``raw``) kept, so it is forwarded byte for byte."""

    record: PeerRecord
    raw: bytes

    @property
    def peer_id(self) -> PeerId:
        return PeerId(self.record.peer_id)


def sign_record(identity: NodeIdentity, record: PeerRecord) -> SignedRecord:
    """Sign ``record`` (which must describe ``identity``) and return it with its wire bytes.

    Raises:
        ValueError: the record describes another peer, or its wire form exceeds MAX_RECORD_BYTES.
    """
    if record.peer_id != identity.peer_id:
        raise ValueError("a node may only sign its own record")
    body = msgpack.packb(record.model_dump(mode="python"), use_bin_type=True)
    raw = msgpack.packb({"body": body, "sig": identity.sign(_SIG_CONTEXT + body)}, use_bin_type=True)
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"record is {len(raw)} bytes, over the {MAX_RECORD_BYTES}-byte limit")
    return SignedRecord(record, raw)


class RecordRejected(Exception):
    """A record failed validation (internal to this module's callers; carries the reason)."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: RejectReason = reason


def parse_record(raw: bytes, swarm: str, now: float) -> SignedRecord:
    """Validate one signed record from the wire.

    Raises:
        RecordRejected: with the reason (oversized, malformed, unsigned, forged, expired, foreign_swarm).
    """
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordRejected("oversized", f"{len(raw)} bytes")
    try:
        outer: Any = msgpack.unpackb(raw, raw=False, use_list=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise RecordRejected("malformed", str(exc)) from exc
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), bytes):
        raise RecordRejected("malformed", "not a {body, sig} map")
    sig = outer.get("sig")
    if set(outer) - {"body", "sig"}:
        raise RecordRejected("malformed", "unknown fields in the envelope")
    if not isinstance(sig, bytes) or not sig:
        raise RecordRejected("unsigned", "no signature")
    body: bytes = outer["body"]
    try:
        fields = msgpack.unpackb(body, raw=False, use_list=False)
        record = PeerRecord.model_validate(fields)
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        ValidationError,
    ) as exc:
        raise RecordRejected("malformed", str(exc).splitlines()[0]) from exc
    if not verify(record.peer_id, _SIG_CONTEXT + body, sig):
        raise RecordRejected("forged", f"signature does not match peer {record.peer_id}")
    for attestation in record.attestations:
        why = attestation_problem(attestation, record.peer_id)
        if why is not None:
            raise RecordRejected("forged", why)
    if record.swarm != swarm:
        raise RecordRejected("foreign_swarm", f"record of swarm {record.swarm!r}")
    if record.expires_at <= now:
        raise RecordRejected("expired", f"expired {now - record.expires_at:.1f} s ago")
    if record.expires_at > now + MAX_TTL_S + CLOCK_SKEW_S:
        raise RecordRejected("expired", "expiry too far in the future")
    return SignedRecord(record, raw)


def _newer(a: SignedRecord, b: SignedRecord) -> bool:
    """True when ``a`` supersedes ``b`` (same peer): higher seq, ties by larger wire bytes."""
    return (a.record.seq, a.raw) > (b.record.seq, b.raw)


class ClusterState:
    """The view: peer ID -> newest valid signed record (a CRDT; see the module docstring).

    Args:
        swarm: records of other swarms are rejected.
        metrics: where accepted/rejected records are counted (optional).
    """

    def __init__(self, swarm: str, metrics: OverlayMetrics | None = None) -> None:
        self.swarm = swarm
        self._metrics = metrics
        self._records: dict[PeerId, SignedRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._records

    def get(self, peer_id: str) -> SignedRecord | None:
        return self._records.get(PeerId(peer_id))

    def records(self) -> list[SignedRecord]:
        return list(self._records.values())

    def digest(self) -> dict[str, int]:
        """``peer_id -> seq`` of every record held (what anti-entropy exchanges first)."""
        return {p: r.record.seq for p, r in self._records.items()}

    def newer_than(self, have: dict[str, int]) -> list[SignedRecord]:
        """Records this view holds that are newer than (or absent from) ``have``."""
        return [r for p, r in self._records.items() if have.get(p, -1) < r.record.seq]

    def merge_raw(self, raw: bytes, now: float) -> SignedRecord | None:
        """Validate and merge one record from the wire.

        Returns:
            the record when it changed the view, ``None`` when it was rejected or not newer.
        """
        try:
            signed = parse_record(raw, self.swarm, now)
        except RecordRejected as exc:
            self._reject(exc.reason, str(exc))
            return None
        return self.merge_record(signed)

    def merge_record(self, signed: SignedRecord) -> SignedRecord | None:
        """Merge an already validated record; ``None`` when the view already had it or newer."""
        current = self._records.get(signed.peer_id)
        if current is not None and not _newer(signed, current):
            if current.raw != signed.raw:
                self._reject("stale", f"seq {signed.record.seq} <= {current.record.seq}")
            return None
        self._records[signed.peer_id] = signed
        if self._metrics is not None:
            self._metrics.records_accepted.inc()
            self._metrics.peers.set(len(self._records))
        return signed

    def merge(self, other: ClusterState) -> None:
        """Join ``other`` into this view (the CRDT merge; both hold validated records)."""
        for signed in other.records():
            self.merge_record(signed)

    def merge_all(self, raws: Iterable[bytes], now: float) -> list[SignedRecord]:
        """Merge many wire records; return those that changed the view."""
        return [s for s in (self.merge_raw(r, now) for r in raws) if s is not None]

    def expire(self, now: float) -> list[PeerId]:
        """Drop records whose expiry has passed; return the peers that left the view."""
        gone = [p for p, r in self._records.items() if r.record.expires_at <= now]
        for p in gone:
            del self._records[p]
        if gone and self._metrics is not None:
            self._metrics.peers.set(len(self._records))
        return gone

    def _reject(self, reason: RejectReason, detail: str) -> None:
        log.debug("rejected a peer record: %s", detail)
        if self._metrics is not None:
            self._metrics.records_rejected.labels(reason).inc()
