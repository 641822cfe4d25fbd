"""The verifier: answers peers' challenges, challenges peers, keeps this node's attestations.

Checks, one subject per round (every ``interval_s``, jittered by +-20 %, least recently checked
first), for each model a peer advertises by content address (``ModelAd.sha256``):

* this node holds the same GGUF: a ``logprob`` challenge (:mod:`.challenge`), judged against the
  same challenge run on the local model; and the advertised chunk root must equal ours;
* it does not: ``possession`` (three nonce-chosen chunks with Merkle proofs against the advertised
  root, which must also be the root most holders of that SHA-256 advertise) and, with two or more
  holders, ``majority`` (the same challenge to up to three holders; peers outside the majority fail).

A peer that advertises a model and refuses to prove it (not found, bad request, garbage or a
wrong nonce) fails (fail closed); a peer that is unreachable, busy or whose engine errs is left
to the next round (liveness is the router's backoff, not a verdict).
Every verdict is signed (:mod:`.attestations`) and published in this node's record at once.
Remote calls carry the RPC deadlines (``rpc.CHALLENGE_TIMEOUT_S``, ``rpc.REQUEST_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from potluck.errors import (
    ModelFileError,
    ModelNotFound,
    NetworkError,
    Overloaded,
    PotluckError,
    ProtocolViolation,
    RequestError,
)
from potluck.identity import NodeIdentity, PeerId
from potluck.overlay.state import ModelAd, SignedRecord
from potluck.overlay.verification import merkle
from potluck.overlay.verification.attestations import MAX_ATTESTATIONS, Attestation, Method, sign
from potluck.overlay.verification.challenge import (
    CHALLENGE_TOKENS,
    Answer,
    ChallengeModel,
    judge,
    majority,
    prompt_for,
)
from potluck.overlay.verification.fileid import FileIdentity
from potluck.overlay.verification.reputation import Standing, standings
from potluck.overlay.wire import (
    MAX_POSSESSION_CHUNKS,
    ChallengeAnswer,
    ChallengeRequest,
    PossessionProof,
    PossessionRequest,
)

log = logging.getLogger(__name__)

MAJORITY_PEERS = 3  # holders asked the same challenge in a majority check
_STANDING_TTL_S = 1.0  # standings are recomputed from the state at most this often


class VerifierPort(Protocol):
    """What the verifier needs of the overlay (:class:`potluck.overlay.service.OverlayService`)."""

    @property
    def peer_id(self) -> PeerId: ...

    def signed_records(self) -> list[SignedRecord]: ...

    def is_admitted(self, peer: PeerId) -> bool: ...

    async def call_challenge(self, peer: PeerId, request: ChallengeRequest) -> ChallengeAnswer: ...

    async def call_possession(self, peer: PeerId, request: PossessionRequest) -> PossessionProof: ...

    async def publish_own_record(self) -> SignedRecord: ...


@dataclass(frozen=True)
class HeldModel:
    """A model this node serves from a file it hashed, with what answers challenges on it."""

    model_id: str
    file: FileIdentity
    model: ChallengeModel


class Verifier:
    """Serving-quality checks for one node.

    Args:
        identity: signs this node's attestations.
        port: the overlay.
        interval_s: mean seconds between rounds (0: never challenge, only answer).
    """

    def __init__(self, identity: NodeIdentity, port: VerifierPort, interval_s: float) -> None:
        self.identity = identity
        self.port = port
        self.interval_s = interval_s
        self.held: dict[str, HeldModel] = {}  # by SHA-256
        self._own: dict[tuple[str, str, str], Attestation] = {}  # (subject, sha256, method) -> latest
        self._checked: dict[tuple[str, str], float] = {}  # (subject, sha256) -> monotonic time of last check
        self._answering = asyncio.Semaphore(1)
        self._cache: tuple[float, dict[str, Standing]] = (-1e9, {})

    # ------------------------------------------------------------------ this node's models
    def add_model(self, model_id: str, file: FileIdentity, model: ChallengeModel) -> None:
        """Serve challenges and possession proofs on ``file`` (and check peers that advertise it)."""
        self.held[file.sha256] = HeldModel(model_id, file, model)

    def content_id(self, model_id: str) -> FileIdentity | None:
        """The content address of a served model (what this node's record advertises)."""
        return next((h.file for h in self.held.values() if h.model_id == model_id), None)

    async def answer_challenge(self, request: ChallengeRequest) -> ChallengeAnswer:
        """RPC ``challenge``: the greedy walk on the model ``request.model_sha256``.

        Raises:
            ModelNotFound: this node does not hold that file. Overloaded: another challenge runs.
        """
        held = self.held.get(request.model_sha256)
        if held is None:
            raise ModelNotFound(f"no model with sha256 {request.model_sha256} here")
        if self._answering.locked():
            raise Overloaded("a challenge is already being answered", retry_after=1.0)
        async with self._answering:
            a = await held.model.answer(request.prompt, request.n_tokens)
        return ChallengeAnswer(nonce=request.nonce, tokens=a.tokens, logprobs=a.logprobs, gaps=a.gaps)

    async def answer_possession(self, request: PossessionRequest) -> PossessionProof:
        """RPC ``possession``: the requested chunks of the file and their audit paths.

        Raises:
            ModelNotFound: this node does not hold that file. RequestError: no such chunk.
            ModelFileError: the file cannot be read any more.
        """
        held = self.held.get(request.model_sha256)
        if held is None:
            raise ModelNotFound(f"no model with sha256 {request.model_sha256} here")
        try:
            chunks = [await asyncio.to_thread(held.file.read_chunk, i) for i in request.indices]
            paths = [held.file.proof(i) for i in request.indices]
        except IndexError as exc:
            raise RequestError(f"possession request: {exc}") from exc
        except OSError as exc:
            raise ModelFileError(f"cannot read the model file {held.file.path}: {exc}") from exc
        return PossessionProof(nonce=request.nonce, chunks=tuple(chunks), paths=tuple(paths))

    # ------------------------------------------------------------------ standings
    def attestations(self) -> tuple[Attestation, ...]:
        """This node's latest verdicts (at most ``MAX_ATTESTATIONS``), for its record."""
        return tuple(sorted(self._own.values(), key=lambda a: a.at)[-MAX_ATTESTATIONS:])

    def standings(self) -> dict[str, Standing]:
        now = time.monotonic()
        if now - self._cache[0] > _STANDING_TTL_S:
            every = [a for r in self.port.signed_records() for a in r.record.attestations]
            self._cache = (now, standings(every, self.identity.peer_id, time.time()))
        return self._cache[1]

    def reputation(self, peer: str) -> float:
        """Score of ``peer`` in [0, 1] (0.5 without evidence): see :mod:`.reputation`."""
        return self.standings().get(peer, Standing()).reputation

    def excluded(self, peer: str) -> str | None:
        """Why ``peer`` must not get requests (it failed verification), or ``None``."""
        return self.standings().get(peer, Standing()).excluded

    def view(self, peer: str) -> dict[str, object]:
        """JSON-ready ``verification`` field of a peer in the cluster view."""
        s = self.standings().get(peer, Standing())
        latest = s.latest
        return {
            "reputation": s.reputation,
            "passes": s.passes,
            "fails": s.fails,
            "excluded": s.excluded,
            "last": None
            if latest is None
            else {"method": latest.method, "verdict": latest.verdict, "by": latest.attester, "detail": latest.detail},
        }

    # ------------------------------------------------------------------ checking peers
    async def run(self) -> None:
        """Check one peer per round, forever (an owned background task; cancel it to stop)."""
        if self.interval_s <= 0:
            return
        while True:
            await asyncio.sleep(self.interval_s * random.uniform(0.8, 1.2))
            await self.check_next()

    def _targets(self) -> list[tuple[PeerId, ModelAd]]:
        me = self.port.peer_id
        return [
            (r.peer_id, ad)
            for r in self.port.signed_records()
            for ad in r.record.models
            if r.peer_id != me and ad.sha256 is not None and self.port.is_admitted(r.peer_id)
        ]

    async def check_next(self) -> list[Attestation]:
        """Run the checks on the least recently checked (peer, model); returns the new verdicts."""
        targets = self._targets()
        if not targets:
            return []
        peer, ad = min(targets, key=lambda t: self._checked.get((t[0], t[1].sha256 or ""), 0.0))
        assert ad.sha256 is not None
        self._checked[(peer, ad.sha256)] = time.monotonic()
        held = self.held.get(ad.sha256)
        if held is not None:
            new = [await self._check_held(peer, ad, held)]
        else:
            new = [await self._check_possession(peer, ad, targets)]
            new += await self._check_majority(peer, ad, targets)
        verdicts = [a for a in new if a is not None]
        if verdicts:
            for a in verdicts:
                self._own[(a.subject, a.model_sha256, a.method)] = a
                log.log(
                    logging.WARNING if a.verdict == "fail" else logging.INFO,
                    "verification of %s (%s): %s %s %s",
                    a.subject,
                    ad.id,
                    a.method,
                    a.verdict,
                    a.detail,
                )
            self._cache = (-1e9, {})
            await self.port.publish_own_record()
        return verdicts

    def _attest(self, peer: str, sha: str, method: Method, why: str | None, nonce: bytes, ok: str = "") -> Attestation:
        return sign(self.identity, peer, sha, method, "pass" if why is None else "fail", nonce, why or ok)

    async def _check_held(self, peer: PeerId, ad: ModelAd, held: HeldModel) -> Attestation | None:
        nonce = os.urandom(16)
        if ad.merkle_root != held.file.merkle_root:
            return self._attest(
                peer, held.file.sha256, "possession", "advertises another chunk root for this sha256", nonce
            )
        prompt = prompt_for(nonce)
        request = ChallengeRequest(model_sha256=held.file.sha256, nonce=nonce, prompt=prompt, n_tokens=CHALLENGE_TOKENS)
        try:
            reply = await self.port.call_challenge(peer, request)
        except (ModelNotFound, ProtocolViolation, RequestError) as exc:
            return self._attest(peer, held.file.sha256, "logprob", f"refused the challenge: {exc}", nonce)
        except (NetworkError, Overloaded, PotluckError, TimeoutError) as exc:
            log.info("challenge of %s not answered (next round): %s", peer, exc)
            return None
        try:
            local = await held.model.answer(prompt, CHALLENGE_TOKENS)
        except PotluckError as exc:  # our own model is busy or failed: no verdict on the peer
            log.info("could not run our own side of a challenge: %s", exc)
            return None
        verdict, detail = judge(Answer(reply.tokens, reply.logprobs, reply.gaps), local, CHALLENGE_TOKENS)
        if verdict is None:
            log.info("challenge of %s inconclusive: %s", peer, detail)
            return None
        return self._attest(peer, held.file.sha256, "logprob", detail if verdict == "fail" else None, nonce, detail)

    async def _check_possession(
        self, peer: PeerId, ad: ModelAd, targets: Sequence[tuple[PeerId, ModelAd]]
    ) -> Attestation | None:
        sha, nonce = ad.sha256 or "", os.urandom(16)
        roots = Counter(a.merkle_root for p, a in targets if a.sha256 == sha)
        root_hex, votes = roots.most_common(1)[0]
        if ad.merkle_root != root_hex and votes * 2 > sum(roots.values()):
            return self._attest(peer, sha, "possession", "advertises a chunk root other holders do not", nonce)
        n = merkle.n_chunks(ad.size_bytes)
        if ad.merkle_root is None or n == 0:
            return self._attest(peer, sha, "possession", "advertises no chunk root or size", nonce)
        picks = [int.from_bytes(hashlib.sha256(nonce + bytes([i])).digest()[:8], "big") % n for i in range(3)]
        indices = tuple(sorted(set(picks)))[:MAX_POSSESSION_CHUNKS]
        try:
            proof = await self.port.call_possession(
                peer, PossessionRequest(model_sha256=sha, nonce=nonce, indices=indices)
            )
        except (ModelNotFound, ProtocolViolation, RequestError) as exc:
            return self._attest(peer, sha, "possession", f"refused to prove possession: {exc}", nonce)
        except (NetworkError, Overloaded, PotluckError, TimeoutError) as exc:
            log.info("possession check of %s not answered (next round): %s", peer, exc)
            return None
        why = _possession_problem(bytes.fromhex(ad.merkle_root), ad.size_bytes, indices, proof)
        return self._attest(peer, sha, "possession", why, nonce, f"{len(indices)} chunks proven")

    async def _check_majority(
        self, peer: PeerId, ad: ModelAd, targets: Sequence[tuple[PeerId, ModelAd]]
    ) -> list[Attestation]:
        sha, nonce = ad.sha256 or "", os.urandom(16)
        others = [p for p, a in targets if a.sha256 == sha and p != peer]
        voters = [peer, *random.sample(others, min(len(others), MAJORITY_PEERS - 1))]
        if len(voters) < 2:
            return []
        prompt = prompt_for(nonce)
        request = ChallengeRequest(model_sha256=sha, nonce=nonce, prompt=prompt, n_tokens=CHALLENGE_TOKENS)
        replies = await asyncio.gather(*(self.port.call_challenge(p, request) for p in voters), return_exceptions=True)
        answers: dict[str, Answer] = {}
        for p, reply in zip(voters, replies, strict=True):
            if isinstance(reply, ChallengeAnswer):
                answers[p] = Answer(reply.tokens, reply.logprobs, reply.gaps)
            elif not isinstance(reply, (PotluckError, TimeoutError)):
                raise reply  # a bug or a cancellation: never swallowed
        vote = majority(answers)
        if vote is None:
            return []
        agree, disagree = vote
        detail = f"agrees with {len(agree)} of {len(answers)} holders"
        return [self._attest(p, sha, "majority", None, nonce, detail) for p in agree] + [
            self._attest(p, sha, "majority", f"answer disagrees with {len(agree)} of {len(answers)} holders", nonce)
            for p in disagree
        ]


def _possession_problem(root: bytes, size: int, indices: Sequence[int], proof: PossessionProof) -> str | None:
    """Why ``proof`` does not prove ``indices`` of the file with chunk root ``root``, or ``None``."""
    n = merkle.n_chunks(size)
    if len(proof.chunks) != len(indices) or len(proof.paths) != len(indices):
        return f"sent {len(proof.chunks)} chunks for {len(indices)} asked"
    for i, chunk, path in zip(indices, proof.chunks, proof.paths, strict=True):
        expected = min(merkle.CHUNK_SIZE, size - i * merkle.CHUNK_SIZE)
        if len(chunk) != expected:
            return f"chunk {i} is {len(chunk)} bytes, not {expected}"
        if not merkle.verify(root, i, n, merkle.leaf_hash(chunk), path):
            return f"chunk {i} does not match the advertised chunk root"
    return None
