"""Binary wire format of the sharding data plane (star all-reduce, shard transfer).

A frame is a fixed 40-byte little-endian prefix, then an optional msgpack control header, then the raw
bytes of an optional array::

    offset size field
         0    4 magic            b"PLTK"
         4    1 version          1
         5    1 kind             :class:`Kind`
         6    1 dtype code       :class:`DType` (0 = no array)
         7    1 ndim             0..4
         8    8 sequence number  u64, per connection and direction, starting at 0
        16   16 shape            4 x u32; slots past ``ndim`` must be 0
        32    4 header length    u32, bytes of msgpack that follow the prefix
        36    4 payload length   u32, bytes of array data after the header
        40    . msgpack header (a map with str keys), then the array bytes (C order, little-endian)

Validation is strict and fails with :class:`~potluck.errors.ProtocolViolation` naming the field: wrong
magic/version/kind, dtype outside the whitelist (float32, float16, and opaque bytes for shard chunks),
``ndim`` > 4, non-zero unused shape slots, payload length that is not ``prod(shape) * itemsize``,
header or frame larger than the limits, msgpack that is not a map of str keys with plain values. Nothing
is ever unpickled. The sequence number is checked by the channel (:mod:`potluck.sharding.collective.channel`).
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from potluck.errors import ProtocolViolation

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_NDIM",
    "PREFIX",
    "VERSION",
    "DType",
    "Kind",
    "Prefix",
    "byte_view",
    "decode_header",
    "decode_prefix",
    "encode_frame",
    "encode_packed",
    "encode_prefix",
    "pack_header",
    "wire_array",
]

MAGIC = b"PLTK"
VERSION = 1
MAX_NDIM = 4
PREFIX = struct.Struct("<4sBBBBQ4III")
assert PREFIX.size == 40
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
_MAX_HEADER_DEPTH = 8


class Kind(enum.IntEnum):
    """What a frame carries. Handshake kinds first, then the collective, then shard transfer."""

    HELLO = 1  # initiator -> responder: who I am + nonce
    CHALLENGE = 2  # responder -> initiator: its nonce + its proof
    AUTH = 3  # initiator -> responder: its proof
    AUTH_OK = 4  # responder -> initiator: admitted
    REFUSED = 5  # either way: refused, header {"reason": str}; the connection closes
    BROADCAST = 10  # master -> worker: control header + optional array
    PARTIAL = 11  # worker -> master: partial sum for an all-reduce
    REDUCED = 12  # master -> worker: the sum
    MANIFEST_REQ = 20  # receiver -> sender: {"model": str, "plan": str}
    MANIFEST = 21  # sender -> receiver: manifest map
    CHUNK_REQ = 22  # receiver -> sender: {"index": int}
    CHUNK = 23  # sender -> receiver: {"index": int} + bytes payload
    DONE = 24  # receiver -> sender: transfer finished
    CLOSE = 30  # orderly goodbye


class DType(enum.IntEnum):
    """Whitelisted payload dtypes. BYTES is an opaque 1-D byte string (shard chunks)."""

    NONE = 0
    FLOAT32 = 1
    FLOAT16 = 2
    BYTES = 3


_NP_DTYPE: dict[DType, np.dtype[Any]] = {
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.BYTES: np.dtype("u1"),
}
_ITEMSIZE = {DType.NONE: 0, DType.FLOAT32: 4, DType.FLOAT16: 2, DType.BYTES: 1}
_KINDS = frozenset(int(k) for k in Kind)


@dataclass(frozen=True, slots=True)
class Prefix:
    """The validated fixed part of a frame."""

    kind: Kind
    seq: int
    dtype: DType
    shape: tuple[int, ...]
    header_len: int
    payload_len: int

    @property
    def np_dtype(self) -> np.dtype[Any] | None:
        return _NP_DTYPE.get(self.dtype)

    @property
    def body_len(self) -> int:
        """Bytes after the prefix: header plus payload."""
        return self.header_len + self.payload_len


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array as a flat ``memoryview`` of format "B" (no copy)."""
    return array.reshape(-1).view(np.uint8).data


def dtype_code(dtype: np.dtype[Any]) -> DType:
    """The wire code of a numpy dtype.

    Raises:
        ProtocolViolation: dtype outside the whitelist (float32, float16, uint8 as bytes).
    """
    key = (dtype.kind, dtype.itemsize)
    if key == ("f", 4):
        return DType.FLOAT32
    if key == ("f", 2):
        return DType.FLOAT16
    if key == ("u", 1):
        return DType.BYTES
    raise ProtocolViolation(f"dtype {dtype} is not allowed on the wire (float32, float16, bytes)")


def wire_array(array: np.ndarray) -> np.ndarray:
    """``array`` as a C-contiguous little-endian array fit to be framed (no copy when it already is).

    Raises:
        ProtocolViolation: dtype not whitelisted or more than :data:`MAX_NDIM` dimensions.
    """
    code = dtype_code(array.dtype)
    if array.ndim > MAX_NDIM:
        raise ProtocolViolation(f"array has {array.ndim} dimensions, the wire allows at most {MAX_NDIM}")
    if code is DType.BYTES and array.ndim != 1:
        raise ProtocolViolation("a bytes payload must be 1-D")
    # np.require, not np.ascontiguousarray: the latter turns 0-d arrays into 1-d ones.
    return np.require(array, dtype=_NP_DTYPE[code], requirements="C")


def encode_prefix(
    kind: Kind, seq: int, dtype: DType, shape: tuple[int, ...], header_len: int, payload_len: int
) -> bytes:
    """Pack the 40-byte prefix. The caller guarantees consistent lengths (see :func:`encode_frame`)."""
    dims = (*shape, 0, 0, 0, 0)[:MAX_NDIM]
    return PREFIX.pack(MAGIC, VERSION, kind, dtype, len(shape), seq, *dims, header_len, payload_len)


def pack_header(header: dict[str, Any] | None) -> bytes:
    """msgpack-encode a control header (``b""`` for an empty one).

    Raises:
        ProtocolViolation: not msgpack-able or larger than :data:`MAX_HEADER_BYTES`.
    """
    if not header:
        return b""
    try:
        packed: bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolViolation(f"control header is not msgpack-able: {exc}") from exc
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolViolation(f"control header is {len(packed)} bytes, the limit is {MAX_HEADER_BYTES}")
    return packed


def encode_frame(
    kind: Kind,
    seq: int,
    header: dict[str, Any] | None = None,
    array: np.ndarray | None = None,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> tuple[bytes, memoryview | None]:
    """Encode one frame as (prefix + msgpack header, payload view) for scatter-gather sending.

    Args:
        kind: frame kind.
        seq: sequence number of this frame on its connection and direction.
        header: msgpack-able map with str keys, or None for an empty header (0 bytes on the wire).
        array: optional payload; must already be a :func:`wire_array` (C-contiguous, whitelisted dtype).

    Returns:
        ``(head, payload)``: ``head`` is the prefix followed by the packed header; ``payload`` is a
        byte view of ``array`` without copying, or None.

    Raises:
        ProtocolViolation: header not msgpack-able or too large, array not framable, frame too large.
    """
    return encode_packed(kind, seq, pack_header(header), array, max_frame_bytes=max_frame_bytes)


def encode_packed(
    kind: Kind,
    seq: int,
    packed: bytes,
    array: np.ndarray | None = None,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> tuple[bytes, memoryview | None]:
    """:func:`encode_frame` with an already packed header (see :func:`pack_header`), so a broadcast
    packs its header once for all receivers."""
    shape: tuple[int, ...] = ()
    payload: memoryview | None = None
    if array is None:
        code = DType.NONE
    else:
        code = dtype_code(array.dtype)
        if not array.flags.c_contiguous or array.ndim > MAX_NDIM or array.dtype.str[0] == ">":
            raise ProtocolViolation("payload array must be C-contiguous, little-endian, at most 4-D (see wire_array)")
        shape = array.shape
        if any(d > 0xFFFFFFFF for d in shape):
            raise ProtocolViolation(f"array dimension too large for the wire: {shape}")
        payload = byte_view(array)
    payload_len = 0 if payload is None else payload.nbytes
    total = PREFIX.size + len(packed) + payload_len
    if total > max_frame_bytes:
        raise ProtocolViolation(f"frame of {total} bytes exceeds the limit of {max_frame_bytes} bytes")
    return encode_prefix(kind, seq, code, shape, len(packed), payload_len) + packed, payload


def decode_prefix(buf: bytes | bytearray | memoryview, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Prefix:
    """Parse and validate the 40-byte prefix.

    Raises:
        ProtocolViolation: with the offending field in the message.
    """
    if len(buf) < PREFIX.size:
        raise ProtocolViolation(f"frame prefix is {len(buf)} bytes, expected {PREFIX.size}")
    magic, version, kind, code, ndim, seq, d0, d1, d2, d3, hlen, plen = PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolViolation(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ProtocolViolation(f"unsupported frame version {version}, expected {VERSION}")
    if kind not in _KINDS:
        raise ProtocolViolation(f"unknown frame kind {kind}")
    if code > DType.BYTES:
        raise ProtocolViolation(f"dtype code {code} is not in the whitelist")
    dtype = DType(code)
    if ndim > MAX_NDIM:
        raise ProtocolViolation(f"ndim {ndim} exceeds {MAX_NDIM}")
    dims = (d0, d1, d2, d3)
    if any(dims[ndim:]):
        raise ProtocolViolation(f"shape slots past ndim={ndim} must be zero, got {dims}")
    shape = dims[:ndim]
    if dtype is DType.NONE:
        if ndim or plen:
            raise ProtocolViolation(f"frame without array has ndim={ndim}, payload length {plen}")
    elif dtype is DType.BYTES and ndim != 1:
        raise ProtocolViolation(f"bytes payload must be 1-D, got ndim={ndim}")
    elif plen != math.prod(shape) * _ITEMSIZE[dtype]:
        raise ProtocolViolation(f"payload length {plen} does not match shape {shape} x {_ITEMSIZE[dtype]} bytes")
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolViolation(f"header length {hlen} exceeds {MAX_HEADER_BYTES}")
    if PREFIX.size + hlen + plen > max_frame_bytes:
        raise ProtocolViolation(
            f"frame of {PREFIX.size + hlen + plen} bytes exceeds the limit of {max_frame_bytes} bytes"
        )
    return Prefix(Kind(kind), seq, dtype, shape, hlen, plen)


def _reject_ext(code: int, data: bytes) -> None:
    raise ProtocolViolation(f"msgpack extension type {code} is not allowed in a control header")


def _check_plain(value: Any, depth: int = 0) -> None:
    if depth > _MAX_HEADER_DEPTH:
        raise ProtocolViolation(f"control header nests deeper than {_MAX_HEADER_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolViolation(f"control header key {key!r} is not a str")
            _check_plain(item, depth + 1)
        return
    raise ProtocolViolation(f"control header value of type {type(value).__name__} is not allowed")


def decode_header(buf: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode a msgpack control header: a map with str keys and plain values (no ext types).

    An empty buffer is the empty header ``{}``.

    Raises:
        ProtocolViolation: not msgpack, trailing bytes, not a map, non-str keys, ext types, too deep.
    """
    if not len(buf):
        return {}
    try:
        value = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            timestamp=0,
        )
    except ProtocolViolation:
        raise
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolViolation(f"control header is not valid msgpack: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolViolation(f"control header must be a map, got {type(value).__name__}")
    _check_plain(value)
    return value
