"""The tensor-parallel join messages: sharding's strict schemas, carried by the overlay as bytes."""

from __future__ import annotations

import msgpack
import pytest

from potluck.errors import ProtocolViolation
from potluck.sharding.orchestration.messages import MAX_MESSAGE_BYTES, TpJoinReply, TpJoinRequest


def good_join(**overrides: object) -> dict:
    fields = {
        "t": "tp_join",
        "session": "0" * 32,
        "model": "m.gguf",
        "rank": 1,
        "world_size": 2,
        "plan": b"\x80",
        "model_sha256": "a" * 64,
        "plan_hash": "p-r1",
        "shard_sha256": "f" * 64,
        "shard_bytes": 10,
        "key": b"k" * 32,
        "star_addrs": (("127.0.0.1", 9000),),
        "transport": "auto",
        "timeout_s": 10.0,
        "accuracy_level": 4,
    }
    fields.update(overrides)
    return fields


def test_join_messages_round_trip():
    req = TpJoinRequest.model_validate(good_join())
    assert TpJoinRequest.from_msgpack(req.to_msgpack()) == req
    reply = TpJoinReply(session="0" * 32, free_ram=1 << 30)
    assert TpJoinReply.from_msgpack(reply.to_msgpack()) == reply


@pytest.mark.parametrize(
    "bad",
    [
        {"key": b"short"},
        {"session": "not-hex" * 5},
        {"model_sha256": "../escape"},
        {"model_sha256": "a" * 32},  # a prefix is not the SHA-256
        {"plan_hash": "../escape"},
        {"rank": 0},
        {"transport": "carrier-pigeon"},
        {"extra": 1},
        {"t": "tp_join_ok"},
        {"star_addrs": (("127.0.0.1", 0),)},
        {"plan": b"x" * ((64 << 10) + 1)},
    ],
)
def test_join_request_rejects_bad_fields(bad):
    with pytest.raises(ProtocolViolation):
        TpJoinRequest.from_msgpack(msgpack.packb(good_join(**bad), use_bin_type=True))


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"\x80" * (MAX_MESSAGE_BYTES + 1)],
)
def test_join_request_rejects_garbage(payload):
    with pytest.raises(ProtocolViolation):
        TpJoinRequest.from_msgpack(payload)
