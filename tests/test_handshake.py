"""potluck.handshake: proofs bind key, label and every field, unambiguously."""

from __future__ import annotations

from potluck.handshake import MAC_BYTES, Label, new_nonce, prove, verify

KEY = b"k" * 32


def test_proof_verifies_only_with_the_same_key_label_and_fields() -> None:
    n = new_nonce()
    proof = prove(KEY, Label.ADMIT, b"swarm", n)
    assert len(proof) == MAC_BYTES and verify(KEY, Label.ADMIT, proof, b"swarm", n)
    assert not verify(b"x" * 32, Label.ADMIT, proof, b"swarm", n)
    assert not verify(KEY, Label.TP_RESPONDER, proof, b"swarm", n)
    assert not verify(KEY, Label.ADMIT, proof, b"swarm", new_nonce())
    assert not verify(KEY, Label.ADMIT, "not bytes", b"swarm", n)


def test_fields_are_length_prefixed_and_labels_distinct() -> None:
    assert prove(KEY, Label.ADMIT, b"ab", b"c") != prove(KEY, Label.ADMIT, b"a", b"bc")
    assert prove(KEY, Label.TP_INITIATOR, b"a", b"b") != prove(KEY, Label.TP_RESPONDER, b"a", b"b")
    assert len({label.value for label in Label}) == len(Label)
