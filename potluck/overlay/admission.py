"""Swarm admission: who may read or write our state and call our RPC.

py-libp2p's private-network (pnet) mode is not wire-compatible with go/rust libp2p, so admission
lives in our own protocol, ``/potluck/admit/2``, run once per connection after Noise has
authenticated both peer IDs. It is a mutual challenge-response (ISO/IEC 9798-4 style, with HMAC as
the keyed function, RFC 2104):

1. dialer -> listener: ``AdmitChallenge(swarm, nonce_d)``
2. listener -> dialer: ``AdmitProof(mac_l)`` then ``AdmitChallenge(swarm, nonce_l)``
3. dialer -> listener: ``AdmitProof(mac_d)``
4. listener -> dialer: ``AdmitResult(ok)``

``mac = prove(K, Label.ADMIT, swarm, nonce, prover peer ID, verifier peer ID)`` (HMAC-SHA256 over
length-prefixed fields, :mod:`potluck.handshake`) with ``K = SHA256("potluck-swarm/1" | swarm |
secret)``. Binding both authenticated peer IDs and the direction stops replay and reflection; a
fresh 32-byte nonce per challenge stops replay across connections. Without a secret the key is
derived from the swarm name alone: that keeps swarms apart but proves nothing secret. An optional
allowlist admits only listed peer IDs. Every refusal is logged and counted; security checks fail
closed (any error = not admitted). (Version 1 joined the fields with NUL bytes under the label
``potluck-admit/1``; the protocol ID changed with the MAC, so a v1 peer fails to negotiate the
protocol instead of failing its proof.)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import TypeVar

import anyio

from potluck.config import Settings
from potluck.errors import PeerRefused, ProtocolViolation
from potluck.handshake import Label, new_nonce, prove, verify
from potluck.identity import PeerId, Tier
from potluck.overlay.swarm_metrics import OverlayMetrics
from potluck.overlay.wire import AdmitChallenge, AdmitProof, AdmitResult, FrameStream, WireModel

log = logging.getLogger(__name__)

PROTOCOL = "/potluck/admit/2"
F = TypeVar("F", bound=WireModel)
ADMIT_TIMEOUT_S = 10.0
_MAX_ADMIT_FRAME = 1024


class Admission:
    """Swarm membership policy and the set of peers admitted on live connections.

    Args:
        me: this node's peer ID.
        swarm: swarm name.
        secret: swarm secret, or ``None`` for an open swarm.
        allowlist: peer IDs of the owner's devices (``Tier.OWN``).
        allowlist_only: admit only allowlisted peers.
        metrics: refusal counters.
    """

    def __init__(
        self,
        me: PeerId,
        swarm: str,
        secret: str | None,
        allowlist: Iterable[str] = (),
        allowlist_only: bool = False,
        metrics: OverlayMetrics | None = None,
    ) -> None:
        self.me = me
        self.swarm = swarm
        self._key = hashlib.sha256(b"potluck-swarm/1\x00" + swarm.encode() + b"\x00" + (secret or "").encode()).digest()
        self.allowlist = frozenset(allowlist)
        self.allowlist_only = allowlist_only
        self._metrics = metrics
        self._admitted: set[PeerId] = set()

    # ------------------------------------------------------------------ policy
    def mac(self, nonce: bytes, prover: str, verifier: str) -> bytes:
        """``prover``'s proof for ``verifier``'s challenge ``nonce`` (see the module docstring)."""
        return prove(self._key, Label.ADMIT, *self._fields(nonce, prover, verifier))

    def _fields(self, nonce: bytes, prover: str, verifier: str) -> tuple[bytes, ...]:
        return (self.swarm.encode(), nonce, prover.encode(), verifier.encode())

    def check_proof(self, proof: AdmitProof, nonce: bytes, prover: PeerId) -> str | None:
        """Why ``prover``'s proof fails, or ``None`` when it is admitted."""
        if proof.swarm != self.swarm:
            return "foreign_swarm"
        if not verify(self._key, Label.ADMIT, proof.mac, *self._fields(nonce, prover, self.me)):
            return "bad_secret"
        if self.allowlist_only and prover not in self.allowlist:
            return "not_allowlisted"
        return None

    def is_admitted(self, peer: PeerId) -> bool:
        return peer in self._admitted

    @property
    def admitted(self) -> frozenset[PeerId]:
        return frozenset(self._admitted)

    def trust_tier(self, peer: str) -> Tier:
        """``LOCAL`` this node, ``OWN`` an allowlisted own device, ``COMMUNITY`` any other peer."""
        if peer == self.me:
            return Tier.LOCAL
        return Tier.OWN if peer in self.allowlist else Tier.COMMUNITY

    def forget(self, peer: PeerId) -> None:
        """The peer's last connection closed: it must prove itself again."""
        self._admitted.discard(peer)

    def refuse(self, peer: str, reason: str, what: str = "admission") -> PeerRefused:
        """Log and count a refusal; return the error to raise or report."""
        log.warning("refused %s from peer %s: %s", what, peer, reason)
        if self._metrics is not None:
            self._metrics.admission_refused.labels(reason).inc()
        return PeerRefused(f"peer {peer} refused: {reason}")

    def _admit(self, peer: PeerId) -> None:
        if peer not in self._admitted:
            log.info("admitted peer %s to swarm %r", peer, self.swarm)
        self._admitted.add(peer)

    # ------------------------------------------------------------------ protocol (trio thread)
    async def initiate(self, frames: FrameStream, remote: PeerId, deadline_s: float = ADMIT_TIMEOUT_S) -> None:
        """Dialer side of the mutual handshake on a fresh ``/potluck/admit/2`` stream.

        Raises:
            PeerRefused: the remote refused us or failed its own proof.
            ProtocolViolation / TransferError: garbage or a broken stream.
            TimeoutError: past ``deadline_s`` seconds.
        """
        with anyio.fail_after(deadline_s):
            nonce = new_nonce()
            await frames.send(AdmitChallenge(swarm=self.swarm, nonce=nonce))
            their_proof = _expect(await frames.recv(), AdmitProof)
            reason = self.check_proof(their_proof, nonce, remote)
            if reason is not None:
                await frames.send(AdmitResult(ok=False, reason=reason))
                raise self.refuse(remote, reason)
            challenge = _expect(await frames.recv(), AdmitChallenge)
            await frames.send(AdmitProof(swarm=self.swarm, mac=self.mac(challenge.nonce, self.me, remote)))
            result = _expect(await frames.recv(), AdmitResult)
            if not result.ok:
                raise PeerRefused(f"peer {remote} refused to admit us: {result.reason}")
            self._admit(remote)

    async def respond(self, frames: FrameStream, remote: PeerId, deadline_s: float = ADMIT_TIMEOUT_S) -> None:
        """Listener side of the handshake (the ``/potluck/admit/2`` stream handler).

        Raises:
            PeerRefused: the remote failed its proof (we told it so) or refused ours.
        """
        with anyio.fail_after(deadline_s):
            challenge = _expect(await frames.recv(), AdmitChallenge)
            if challenge.swarm != self.swarm:
                await frames.send(AdmitResult(ok=False, reason="foreign_swarm"))
                raise self.refuse(remote, "foreign_swarm")
            await frames.send(AdmitProof(swarm=self.swarm, mac=self.mac(challenge.nonce, self.me, remote)))
            nonce = new_nonce()
            await frames.send(AdmitChallenge(swarm=self.swarm, nonce=nonce))
            reply = await frames.recv()
            if isinstance(reply, AdmitResult):  # the remote rejected our proof
                raise PeerRefused(f"peer {remote} refused to admit us: {reply.reason}")
            reason = self.check_proof(_expect(reply, AdmitProof), nonce, remote)
            if reason is not None:
                await frames.send(AdmitResult(ok=False, reason=reason))
                raise self.refuse(remote, reason)
            self._admit(remote)
            await frames.send(AdmitResult(ok=True, reason=""))


def announced_tier(settings: Settings) -> Tier:
    """The tier a node announces for itself in its signed record.

    ``OWN`` when it admits only allowlisted peers (``allowlist_only``: a swarm of one owner's
    devices, where every peer that can see the record is one of those devices), ``COMMUNITY``
    otherwise. Never ``LOCAL`` (that tier means "the device asking", which depends on who looks)
    nor ``CLOUD``. Peers treat it as a claim: they place us with their own
    :meth:`Admission.trust_tier`.
    """
    return Tier.OWN if settings.allowlist_only else Tier.COMMUNITY


def admit_frames(stream: object) -> FrameStream:
    """A frame stream with the small frame limit admission uses."""
    return FrameStream(stream, max_frame=_MAX_ADMIT_FRAME)  # type: ignore[arg-type]


def _expect(frame: WireModel, kind: type[F]) -> F:
    """``frame`` as ``kind``; a refusal from the remote becomes ``PeerRefused``."""
    if isinstance(frame, kind):
        return frame
    if isinstance(frame, AdmitResult) and not frame.ok:
        raise PeerRefused(f"the peer refused to admit us: {frame.reason}")
    raise ProtocolViolation(f"expected {kind.__name__}, got {type(frame).__name__}")
