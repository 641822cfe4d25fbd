"""The binary frame codec: round trips and precise rejection of malformed frames."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from potluck.errors import ProtocolViolation
from potluck.sharding.collective import frames
from potluck.sharding.collective.frames import DType, Kind

plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
headers = st.dictionaries(st.text(max_size=10), plain_values, max_size=6)
arrays = st.one_of(
    st.none(),
    hnp.arrays(
        dtype=st.sampled_from([np.dtype(np.float32), np.dtype(np.float16)]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
)


def decode(data: bytes, max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES):
    """Decode a whole frame from bytes the way a channel does."""
    prefix = frames.decode_prefix(data[: frames.PREFIX.size], max_frame_bytes=max_frame_bytes)
    body = data[frames.PREFIX.size :]
    assert len(body) == prefix.body_len
    header = frames.decode_header(body[: prefix.header_len])
    array = None
    if prefix.dtype is not DType.NONE:
        array = np.frombuffer(body[prefix.header_len :], dtype=prefix.np_dtype).reshape(prefix.shape)
    return prefix, header, array


def encode(kind, seq, header=None, array=None, **kw) -> bytes:
    head, payload = frames.encode_frame(kind, seq, header, array, **kw)
    return head + (b"" if payload is None else payload.tobytes())


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    header=headers,
    array=arrays,
)
def test_round_trip(kind: Kind, seq: int, header: dict, array: np.ndarray | None) -> None:
    prefix, got_header, got_array = decode(encode(kind, seq, header, array))
    assert prefix.kind is kind and prefix.seq == seq
    assert got_header == header
    if array is None:
        assert got_array is None and prefix.dtype is DType.NONE
    else:
        assert got_array is not None
        assert got_array.dtype == array.dtype and got_array.shape == array.shape
        # Bitwise equality, NaN payloads included.
        assert got_array.tobytes() == array.tobytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=frames.PREFIX.size, max_size=frames.PREFIX.size))
def test_random_prefix_bytes_only_raise_protocol_violation(data: bytes) -> None:
    try:
        frames.decode_prefix(data)
    except ProtocolViolation:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_header_bytes_only_raise_protocol_violation(data: bytes) -> None:
    try:
        assert isinstance(frames.decode_header(data), dict)
    except ProtocolViolation:
        pass


def raw_prefix(**over) -> bytes:
    fields = {
        "magic": frames.MAGIC,
        "version": frames.VERSION,
        "kind": int(Kind.PARTIAL),
        "dtype": int(DType.FLOAT32),
        "ndim": 2,
        "seq": 7,
        "shape": (2, 3, 0, 0),
        "hlen": 0,
        "plen": 24,
    }
    fields.update(over)
    return frames.PREFIX.pack(
        fields["magic"],
        fields["version"],
        fields["kind"],
        fields["dtype"],
        fields["ndim"],
        fields["seq"],
        *fields["shape"],
        fields["hlen"],
        fields["plen"],
    )


def test_valid_prefix_decodes() -> None:
    prefix = frames.decode_prefix(raw_prefix())
    assert prefix == frames.Prefix(Kind.PARTIAL, 7, DType.FLOAT32, (2, 3), 0, 24)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"magic": b"HTTP"}, "bad magic"),
        ({"version": 9}, "unsupported frame version 9"),
        ({"kind": 99}, "unknown frame kind 99"),
        ({"dtype": 7}, "dtype code 7 is not in the whitelist"),
        ({"ndim": 5}, "ndim 5 exceeds 4"),
        ({"shape": (2, 3, 1, 0)}, "shape slots past ndim=2 must be zero"),
        ({"plen": 25}, "payload length 25 does not match shape (2, 3)"),
        ({"dtype": int(DType.FLOAT16)}, "payload length 24 does not match shape (2, 3) x 2 bytes"),
        ({"dtype": 0}, "frame without array has ndim=2"),
        ({"dtype": int(DType.BYTES)}, "bytes payload must be 1-D"),
        ({"hlen": frames.MAX_HEADER_BYTES + 1}, "header length"),
        (
            {"shape": (2**16, 2**14, 0, 0), "plen": 2**32 - 4096, "dtype": int(DType.FLOAT32)},
            "payload length",
        ),
    ],
)
def test_malformed_prefix_is_rejected_precisely(over: dict, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message.replace("(", r"\(").replace(")", r"\)")):
        frames.decode_prefix(raw_prefix(**over))


def test_oversized_frame_is_rejected_before_reading_the_body() -> None:
    # A consistent 1 GiB frame: rejected from its 40-byte prefix alone.
    data = raw_prefix(ndim=1, shape=(2**28, 0, 0, 0), plen=2**30)
    with pytest.raises(ProtocolViolation, match="exceeds the limit"):
        frames.decode_prefix(data)
    with pytest.raises(ProtocolViolation, match="exceeds the limit"):
        frames.decode_prefix(raw_prefix(), max_frame_bytes=50)


def test_short_prefix() -> None:
    with pytest.raises(ProtocolViolation, match="prefix is 10 bytes"):
        frames.decode_prefix(b"\x00" * 10)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({1: 2}), "not valid msgpack"),
        (msgpack.packb({"a": 1}) + b"\x00", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"x")}), "extension type 5"),
        (msgpack.packb({"t": msgpack.Timestamp(1, 0)}), "Timestamp is not allowed"),
        (msgpack.packb({"a": {"b": {1.5: 2}}}, strict_types=False), "not valid msgpack"),
    ],
)
def test_bad_header_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message):
        frames.decode_header(data)


def test_deeply_nested_header_is_rejected() -> None:
    value: object = 1
    for _ in range(12):
        value = [value]
    with pytest.raises(ProtocolViolation, match="nests deeper"):
        frames.decode_header(msgpack.packb({"a": value}))


def test_encode_refuses_what_the_wire_does_not_allow() -> None:
    with pytest.raises(ProtocolViolation, match="int64 is not allowed"):
        frames.wire_array(np.zeros(3, dtype=np.int64))
    with pytest.raises(ProtocolViolation, match="not msgpack-able"):
        frames.encode_frame(Kind.BROADCAST, 0, {"a": object()})
    with pytest.raises(ProtocolViolation, match="at most 4"):
        frames.wire_array(np.zeros((1, 1, 1, 1, 1), dtype=np.float32))
    with pytest.raises(ProtocolViolation, match="exceeds the limit of 1000 bytes"):
        frames.encode_frame(Kind.BROADCAST, 0, None, np.zeros(1000, np.float32), max_frame_bytes=1000)
    with pytest.raises(ProtocolViolation, match="C-contiguous"):
        frames.encode_frame(Kind.BROADCAST, 0, None, np.zeros((4, 4), np.float32)[:, ::2])
    with pytest.raises(ProtocolViolation, match="control header is"):
        frames.encode_frame(Kind.BROADCAST, 0, {"big": b"x" * (frames.MAX_HEADER_BYTES + 1)})


def test_wire_array_fixes_layout_without_copying_when_it_can() -> None:
    a = np.arange(6, dtype=np.float32)
    assert frames.wire_array(a) is a or np.shares_memory(frames.wire_array(a), a)
    big_endian = np.arange(4, dtype=">f4")
    fixed = frames.wire_array(big_endian)
    assert fixed.dtype == np.dtype("<f4") and np.array_equal(fixed, big_endian)


def test_prefix_layout_is_little_endian_and_40_bytes() -> None:
    data = encode(Kind.PARTIAL, 258, None, np.zeros((2, 3), np.float16))
    assert data[:4] == b"PLTK" and len(data) == 40 + 12
    assert struct.unpack_from("<Q", data, 8)[0] == 258
