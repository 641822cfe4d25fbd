"""Serving-quality verification with real llama.cpp models in one process: verifiers talk through an
in-memory port (what the overlay's RPC carries), so many challenges run fast. Each node answers
through a real route on the node's own backend (continuous-batching llama.cpp, greedy, logprobs).

* 50 challenges of an honest holder of the same GGUF (run with another prompt batch size, so
  its numbers differ in the last bits) give no failure: no false positives;
* a peer that advertises the F16 file's SHA-256 while serving the Q4_0 file fails, for a holder
  (logprob check) and for a node without the model (possession and majority checks), and is
  excluded with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from potluck.identity import NodeIdentity, PeerId
from potluck.inference.batched_backend import BatchedLlamaCppBackend
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.overlay.state import Hardware, Load, ModelAd, PeerRecord, SignedRecord, sign_record
from potluck.overlay.verification.challenge import RouteChallengeModel
from potluck.overlay.verification.fileid import FileIdentity, hash_file
from potluck.overlay.verification.verifier import Verifier
from potluck.overlay.wire import ChallengeAnswer, ChallengeRequest, PossessionProof, PossessionRequest
from tests.overlay.conftest import make_identity

MODEL = "tinyshakespeare"


class MemorySwarm:
    """Records and verifiers of a few in-process nodes."""

    def __init__(self) -> None:
        self.records: dict[str, SignedRecord] = {}
        self.verifiers: dict[str, Verifier] = {}

    def node(self, identity: NodeIdentity) -> Verifier:
        verifier = Verifier(identity, MemoryPort(self, identity), interval_s=0)
        self.verifiers[identity.peer_id] = verifier
        return verifier


class MemoryPort:
    """:class:`VerifierPort` over :class:`MemorySwarm` (the RPCs are direct calls)."""

    def __init__(self, swarm: MemorySwarm, identity: NodeIdentity) -> None:
        self.swarm = swarm
        self.identity = identity
        self.seq = 0

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    def signed_records(self) -> list[SignedRecord]:
        return list(self.swarm.records.values())

    def is_admitted(self, peer: PeerId) -> bool:
        return True

    async def call_challenge(self, peer: PeerId, request: ChallengeRequest) -> ChallengeAnswer:
        return await self.swarm.verifiers[peer].answer_challenge(request)

    async def call_possession(self, peer: PeerId, request: PossessionRequest) -> PossessionProof:
        return await self.swarm.verifiers[peer].answer_possession(request)

    async def publish_own_record(self) -> SignedRecord:
        me = self.swarm.verifiers[self.peer_id]
        self.seq += 1
        ads = tuple(
            ModelAd(
                id=h.model_id,
                quantization="F16",
                n_ctx=256,
                n_layers=4,
                n_params=3_400_000,
                sha256=h.file.sha256,
                merkle_root=h.file.merkle_root,
                size_bytes=h.file.size,
            )
            for h in me.held.values()
        )
        record = PeerRecord(
            peer_id=self.peer_id,
            swarm="test",
            models=ads,
            hardware=Hardware(ram_total=1 << 30, ram_free=1 << 29, cores=2, decode_tps=0.0),
            load=Load(queue_depth=0, active=0),
            version="test",
            seq=self.seq,
            expires_at=time.time() + 600,
            attestations=me.attestations(),
        )
        signed = sign_record(self.identity, record)
        self.swarm.records[self.peer_id] = signed
        return signed


@pytest.fixture
def runners(model_path) -> Iterator[dict[str, ModelRunner]]:
    """Three llama.cpp instances: two of the F16 file (prompt batches of 1 and of 512 tokens:
    different kernels and summation orders) and the Q4_0 file. One thread each: on a loaded
    2-core machine llama.cpp's spinning threads make two threads 50x slower."""
    made: dict[str, ModelRunner] = {}
    for name, kind, threads, batch in (("a", "f16", 1, 512), ("b", "f16", 1, 1), ("cheat", "q4_0", 1, 512)):
        backend = BatchedLlamaCppBackend(model_path(kind), MODEL, n_ctx=256, n_threads=threads, n_batch=batch)
        backend.load()
        made[name] = ModelRunner(backend, max_queue=4)
    yield made
    for r in made.values():
        r.close()


def model(runner: ModelRunner) -> RouteChallengeModel:
    return RouteChallengeModel(LoadedModelRoute(runner))


def poisoned(real: Path, claimed: FileIdentity) -> FileIdentity:
    """What a node whose model-id cache was edited advertises: ``claimed``'s hashes, ``real``'s bytes."""
    return FileIdentity(real, claimed.size, claimed.sha256, claimed.merkle_root, claimed.leaves)


async def test_fifty_challenges_of_an_honest_holder_all_pass(runners, model_path):
    f16 = hash_file(model_path("f16"))
    swarm = MemorySwarm()
    a, b = swarm.node(make_identity()), swarm.node(make_identity())
    a.add_model(MODEL, f16, model(runners["a"]))
    b.add_model(MODEL, f16, model(runners["b"]))
    for v in (a, b):
        await v.port.publish_own_record()  # type: ignore[attr-defined]
    b_id = b.identity.peer_id
    verdicts = []
    for _ in range(50):  # 50 challenges; an early split at a near tie gives no verdict
        verdicts += await a.check_next()
    print(f"{len(verdicts)} passes, 0 failures, {50 - len(verdicts)} inconclusive of 50 challenges")
    assert [v.detail for v in verdicts if v.verdict != "pass"] == []
    assert len(verdicts) >= 40 and len({v.nonce for v in verdicts}) == len(verdicts)
    assert {v.method for v in verdicts} == {"logprob"} and {v.subject for v in verdicts} == {b_id}
    assert a.excluded(b_id) is None and a.reputation(b_id) > 0.5

    # A node without the model: possession proofs and majority votes of the two holders pass too.
    c = swarm.node(make_identity())
    await c.port.publish_own_record()  # type: ignore[attr-defined]
    checks = []
    for _ in range(6):
        checks += await c.check_next()
    assert checks and all(v.verdict == "pass" for v in checks), [v.detail for v in checks]
    assert {v.method for v in checks} == {"possession", "majority"}


async def test_a_q4_file_sold_as_f16_is_detected_and_excluded(runners, model_path):
    f16 = hash_file(model_path("f16"))
    swarm = MemorySwarm()
    a, b, cheat = (swarm.node(make_identity()) for _ in range(3))
    a.add_model(MODEL, f16, model(runners["a"]))
    b.add_model(MODEL, f16, model(runners["b"]))
    cheat.add_model(MODEL, poisoned(model_path("q4_0"), f16), model(runners["cheat"]))
    for v in (a, b, cheat):
        await v.port.publish_own_record()  # type: ignore[attr-defined]
    cheat_id, b_id = cheat.identity.peer_id, b.identity.peer_id

    verdicts = [v for _ in range(4) for v in await a.check_next()]  # B and the cheat, twice each
    on_cheat = [v for v in verdicts if v.subject == cheat_id]
    assert on_cheat and all(v.verdict == "fail" and v.method == "logprob" for v in on_cheat)
    reason = a.excluded(cheat_id)
    assert reason is not None and "logprob" in reason
    assert a.excluded(b_id) is None

    # Without the model: the cheat's chunks do not match the root it advertises, and its answers
    # disagree with the two honest holders.
    c = swarm.node(make_identity())
    await c.port.publish_own_record()  # type: ignore[attr-defined]
    seen = [v for _ in range(6) for v in await c.check_next()]
    against = {v.method: v.verdict for v in seen if v.subject == cheat_id}
    assert against.get("possession") == "fail"
    assert "fail" in {v.verdict for v in seen if v.subject == cheat_id and v.method == "majority"} or (
        "majority" not in against
    )
    assert c.excluded(cheat_id) is not None
    assert all(v.verdict == "pass" for v in seen if v.subject != cheat_id), [v.detail for v in seen]


async def test_a_peer_that_advertises_a_model_but_refuses_the_challenge_fails(runners, model_path):
    f16 = hash_file(model_path("f16"))
    swarm = MemorySwarm()
    a, liar = swarm.node(make_identity()), swarm.node(make_identity())
    a.add_model(MODEL, f16, model(runners["a"]))
    liar.add_model(MODEL, f16, model(runners["b"]))
    for v in (a, liar):
        await v.port.publish_own_record()  # type: ignore[attr-defined]
    liar.held.clear()  # it keeps advertising the hash but answers "not found"
    (verdict,) = await a.check_next()
    assert verdict.verdict == "fail" and verdict.detail.startswith("refused the challenge")
    assert a.excluded(liar.identity.peer_id) is not None
