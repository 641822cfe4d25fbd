"""Wire frames and the RPC handler under garbage: strict schemas, size limits, and a fuzz run of
thousands of random and mutated frames after which the server still answers correctly."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest

from potluck.errors import ProtocolViolation, TransferError
from potluck.identity import PeerId
from potluck.overlay.admission import Admission
from potluck.overlay.bridge import TrioThread
from potluck.overlay.rpc import RpcServer
from potluck.overlay.swarm_metrics import OverlayMetrics
from potluck.overlay.wire import (
    MAX_FRAME,
    ErrorFrame,
    FinishFrame,
    FrameStream,
    GenerateRequest,
    PingRequest,
    Pong,
    StateSyncRequest,
    StateSyncResponse,
    TokenFrame,
    WireSampling,
    decode_payload,
    encode,
)
from tests.overlay.memory import MemoryStream

PEER = PeerId("12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo")
STRANGER = PeerId("12D3KooWJHB18N5EvfzWzUXnuASHcyVeRf3UTSvcPbG2TyJJgkgZ")


def replies(data: bytes) -> list:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append(decode_payload(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


class App:
    async def state_sync(self, peer, request):
        return StateSyncResponse(records=(b"r1",))

    async def generate(self, peer, request):
        yield TokenFrame(text="Hello", n_tokens=1)
        yield FinishFrame(finish_reason="stop", prompt_tokens=3, completion_tokens=1)


GEN = GenerateRequest(model="m", params=WireSampling(max_tokens=4, temperature=0.0, top_p=1.0, top_k=0), prompt="hi")


def test_frames_round_trip_and_unknown_fields_are_refused():
    for frame in (PingRequest(nonce=5), GEN, StateSyncRequest(have={"p": 1}, records=(b"x",))):
        data = encode(frame)
        assert decode_payload(data[4:]) == frame
    bad = msgpack.packb({"t": "ping", "nonce": 1, "extra": True})
    with pytest.raises(ProtocolViolation):
        decode_payload(bad)
    with pytest.raises(ProtocolViolation):
        decode_payload(msgpack.packb({"t": "ping", "nonce": -1}))
    with pytest.raises(ProtocolViolation):
        decode_payload(msgpack.packb([1, 2, 3]))
    with pytest.raises(ProtocolViolation):
        decode_payload(b"\xc1")


async def test_oversized_length_is_refused_before_reading_the_payload():
    frames = FrameStream(MemoryStream(struct.pack(">I", MAX_FRAME + 1)))
    with pytest.raises(ProtocolViolation, match="exceeds"):
        await frames.recv()
    with pytest.raises(TransferError):
        await FrameStream(MemoryStream(b"\x00\x00")).recv()
    with pytest.raises(ProtocolViolation):
        encode(StateSyncRequest(records=(b"x" * MAX_FRAME,)))


def _valid_frames() -> list[bytes]:
    return [encode(PingRequest(nonce=1)), encode(GEN), encode(StateSyncRequest(have={}, records=()))]


def _mutations(rng: random.Random, n: int) -> list[bytes]:
    seeds = _valid_frames()
    out: list[bytes] = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # random bytes with a plausible length prefix
            body = rng.randbytes(rng.randrange(0, 64))
            out.append(struct.pack(">I", len(body)) + body)
        elif kind == 1:  # bit flips in a valid frame
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
            out.append(bytes(data))
        elif kind == 2:  # truncated frame
            data = rng.choice(seeds)
            out.append(data[: rng.randrange(len(data))])
        elif kind == 3:  # lying length prefix (huge or short)
            data = rng.choice(seeds)
            out.append(struct.pack(">I", rng.choice([MAX_FRAME + 1, 0xFFFFFFFF, 1, 2])) + data[4:])
        elif kind == 4:  # well-formed msgpack, wrong schema
            obj = rng.choice(
                [
                    {"t": "generate", "model": 1},
                    {"t": "ping", "nonce": "x"},
                    {"t": "tokens", "text": "a", "n_tokens": 1},  # a reply is not a request
                    {"t": "nope"},
                    {"t": "state_sync", "have": {"p": -1}},
                    {1: 2},
                    [],
                    "string",
                ]
            )
            body = msgpack.packb(obj)
            out.append(struct.pack(">I", len(body)) + body)
        else:  # deep nesting
            body = b"\x91" * rng.randrange(100, 5000) + b"\x00"
            out.append(struct.pack(">I", len(body)) + body)
    return out


async def test_fuzzed_frames_are_rejected_and_the_server_keeps_serving():
    metrics = OverlayMetrics()
    admission = Admission(PeerId("12D3KooWHz4ThAyotu1th7LWgXqEtxJCHepFo5bEsWoitEBLx8DF"), "test", None, metrics=metrics)
    admission._admit(PEER)
    rng = random.Random(1234)
    async with TrioThread("test-fuzz") as bridge:
        server = RpcServer(bridge, App(), admission, metrics)
        for data in _mutations(rng, 3000):
            stream = MemoryStream(data, chunk=rng.choice([1, 5, 4096]))
            await bridge.call(server.handle, stream, PEER)  # must never raise
            for reply in replies(bytes(stream.out)):
                # Garbage gets an error frame (or nothing); a lucky valid mutation gets a real answer.
                assert isinstance(reply, ErrorFrame | Pong | StateSyncResponse | TokenFrame | FinishFrame)
        rejected = metrics.registry.get_sample_value("potluck_overlay_frames_rejected_total")
        assert rejected is not None and rejected > 1500

        # Still serving: ping, state_sync and generate all answer correctly.
        for frame, expect in [
            (PingRequest(nonce=42), [Pong(nonce=42)]),
            (StateSyncRequest(), [StateSyncResponse(records=(b"r1",))]),
            (
                GEN,
                [
                    TokenFrame(text="Hello", n_tokens=1),
                    FinishFrame(finish_reason="stop", prompt_tokens=3, completion_tokens=1),
                ],
            ),
        ]:
            stream = MemoryStream(encode(frame))
            await bridge.call(server.handle, stream, PEER)
            assert replies(bytes(stream.out)) == expect


async def test_unadmitted_peers_are_refused_and_counted():
    metrics = OverlayMetrics()
    admission = Admission(
        PeerId("12D3KooWHz4ThAyotu1th7LWgXqEtxJCHepFo5bEsWoitEBLx8DF"), "test", "s3cret-s3cret", metrics=metrics
    )
    async with TrioThread("test-fuzz") as bridge:
        server = RpcServer(bridge, App(), admission, metrics)
        for frame in (PingRequest(nonce=1), GEN, StateSyncRequest()):
            stream = MemoryStream(encode(frame))
            await bridge.call(server.handle, stream, STRANGER)
            [reply] = replies(bytes(stream.out))
            assert isinstance(reply, ErrorFrame) and reply.code == "refused"
    assert metrics.registry.get_sample_value("potluck_overlay_admission_refused_total", {"reason": "not_admitted"}) == 3
