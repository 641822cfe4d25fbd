"""The verification frames on the wire: strict, bounded, round-trip; garbage is refused."""

from __future__ import annotations

import os

import msgpack
import pytest

from potluck.errors import ProtocolViolation
from potluck.overlay.wire import (
    MAX_CHALLENGE_TOKENS,
    ChallengeAnswer,
    ChallengeRequest,
    PossessionProof,
    PossessionRequest,
    decode_payload,
    encode,
)

SHA = "0f" * 32


def roundtrip(frame):
    return decode_payload(encode(frame)[4:])


def test_frames_round_trip():
    frames = [
        ChallengeRequest(model_sha256=SHA, nonce=os.urandom(16), prompt="King crown\n", n_tokens=16),
        ChallengeAnswer(nonce=os.urandom(16), tokens=(b"a", b"\xe2\x80"), logprobs=(-0.1, -2.5), gaps=(0.3, 1e4)),
        PossessionRequest(model_sha256=SHA, nonce=os.urandom(16), indices=(0, 7, 26)),
        PossessionProof(nonce=os.urandom(16), chunks=(os.urandom(256 << 10),) * 3, paths=((os.urandom(32),) * 5,) * 3),
    ]
    for f in frames:
        assert roundtrip(f) == f


@pytest.mark.parametrize(
    "payload",
    [
        {"t": "challenge", "model_sha256": "XY" * 32, "nonce": bytes(16), "prompt": "p", "n_tokens": 16},
        {"t": "challenge", "model_sha256": SHA, "nonce": bytes(8), "prompt": "p", "n_tokens": 16},
        {
            "t": "challenge",
            "model_sha256": SHA,
            "nonce": bytes(16),
            "prompt": "p",
            "n_tokens": MAX_CHALLENGE_TOKENS + 1,
        },
        {"t": "challenge_answer", "nonce": bytes(16), "tokens": (b"a",) * 65, "logprobs": (), "gaps": ()},
        {"t": "challenge_answer", "nonce": bytes(16), "tokens": (b"a",), "logprobs": (0.5,), "gaps": (0.0,)},
        {"t": "challenge_answer", "nonce": bytes(16), "tokens": (1,), "logprobs": (-0.5,), "gaps": (0.0,)},
        {"t": "possession", "model_sha256": SHA, "nonce": bytes(16), "indices": ()},
        {"t": "possession", "model_sha256": SHA, "nonce": bytes(16), "indices": (1, 2, 3, 4)},
        {"t": "possession_proof", "nonce": bytes(16), "chunks": (b"x",), "paths": ((b"short",),)},
        {"t": "possession_proof", "nonce": bytes(16), "chunks": (b"x",), "paths": ((bytes(32),),), "extra": 1},
    ],
)
def test_out_of_bounds_frames_are_refused(payload):
    with pytest.raises(ProtocolViolation):
        decode_payload(msgpack.packb(payload, use_bin_type=True))
