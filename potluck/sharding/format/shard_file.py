"""Shard files: a self-describing container of named raw tensors that a node memory-maps.

Layout (little-endian)::

    magic  b"PLKSHRD\\0"        8 bytes
    format u32                  FORMAT_VERSION
    flags  u32                  0
    hlen   u64                  length of the msgpack header
    header msgpack              {"meta": {...}, "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}]}
    pad to ALIGN
    data                        each tensor at ``data_start + offset``, offsets multiples of ALIGN

Tensors come back as read-only ``np.memmap`` views: opening a shard costs no copy, and the OS
pages weights in on first use. Every field is validated (dtype allow-list, shape/size agreement,
bounds inside the file) so a truncated or forged file fails with :class:`ModelFileError`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from potluck.errors import ModelFileError
from potluck.sharding.format.pages import release_array

MAGIC = b"PLKSHRD\0"
FORMAT_VERSION = 1
ALIGN = 64
MAX_HEADER_BYTES = 64 << 20
_WRITE_CHUNK = 16 << 20
_PREFIX = struct.Struct("<8sIIQ")
_DTYPES = {"float32", "float16", "uint8", "int8", "int32"}


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class ShardData:
    """A shard in memory: metadata plus named arrays (views into a file once loaded).

    Attributes:
        meta: msgpack-able dict (plan, rank, model config, linear layouts).
        tensors: name -> C-contiguous array.
        path: the file the tensors are memory-mapped from (``None``: they are in memory).
    """

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors.values())


class ShardWriter:
    """Writes a shard file one tensor at a time, so a shard bigger than memory can be written.

    The header (which lists every tensor) is only known at the end, so a slot of ``header_bytes``
    is reserved before the data and filled by :meth:`finish`, the msgpack map padded to the exact
    slot size with a ``"pad"`` entry that readers ignore. The file appears atomically (temp file +
    rename) when :meth:`finish` returns; leaving the ``with`` block without it removes the temp file.

    Args:
        path: destination.
        header_bytes: the header slot, bytes (1 MiB holds the header of thousands of tensors).

    Raises:
        OSError: the file cannot be written.
    """

    def __init__(self, path: str | Path, header_bytes: int = 1 << 20) -> None:
        self.path = Path(path)
        self.header_bytes = header_bytes
        self.data_start = _aligned(_PREFIX.size + header_bytes)
        self.entries: list[dict[str, Any]] = []
        self.offset = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fh = self._tmp.open("wb")

    def add(self, name: str, arr: np.ndarray) -> None:
        """Append one tensor (dtypes float32/float16/uint8/int8/int32).

        Raises:
            ValueError: unsupported dtype.
        """
        if arr.dtype.name not in _DTYPES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} not storable")
        self._fh.seek(self.data_start + self.offset)
        flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # a view when arr is contiguous
        for start in range(0, flat.size, _WRITE_CHUNK):  # no whole copy of a big (memory-mapped) tensor
            chunk = flat[start : start + _WRITE_CHUNK]
            self._fh.write(chunk.data)
            release_array(chunk)  # a view of a mapped GGUF (the token embeddings): its pages go again
        self.entries.append(
            {
                "name": name,
                "dtype": arr.dtype.name,
                "shape": list(arr.shape),
                "offset": self.offset,
                "nbytes": int(arr.nbytes),
            }
        )
        self.offset = _aligned(self.offset + int(arr.nbytes))

    def finish(self, meta: Mapping[str, Any]) -> int:
        """Write the header and move the file into place. Returns the file size, bytes.

        Raises:
            ValueError: the header does not fit its slot.
        """
        header = _header(dict(meta), self.entries, self.header_bytes)
        self._fh.seek(0)
        self._fh.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)))
        self._fh.write(header)
        self._fh.truncate(self.data_start + self.offset)
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.data_start + self.offset

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


def _header(meta: dict[str, Any], entries: list[dict[str, Any]], size: int) -> bytes:
    """The msgpack header, padded to exactly ``size`` bytes with a ``"pad"`` binary entry.

    Raises:
        ValueError: it is longer than ``size``, or 1-5 bytes short (no msgpack entry is that small).
    """
    body = {"meta": meta, "tensors": entries}
    packed = msgpack.packb(body, use_bin_type=True)
    extra = size - len(packed)
    if extra == 0:
        return packed
    for bin_header, limit in ((2, 1 << 8), (3, 1 << 16), (5, 1 << 32)):
        k = extra - 4 - bin_header  # fixstr "pad" (4 bytes), the bin header, k bytes
        if 0 <= k < limit:
            padded = msgpack.packb({**body, "pad": bytes(k)}, use_bin_type=True)
            if len(padded) == size:
                return padded
    raise ValueError(f"the shard header ({len(packed)} bytes) does not fit its {size}-byte slot")


def write_shard(path: str | Path, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> int:
    """Write a shard file atomically from tensors in memory (see :class:`ShardWriter` to stream).

    Args:
        path: destination.
        meta: msgpack-able metadata.
        tensors: arrays of dtypes float32/float16/uint8/int8/int32.

    Returns:
        Bytes written.

    Raises:
        ValueError: unsupported dtype.
        OSError: the file cannot be written.
    """
    offset, entries = 0, []
    for name, arr in tensors.items():
        entries.append(
            {
                "name": name,
                "dtype": arr.dtype.name,
                "shape": list(arr.shape),
                "offset": offset,
                "nbytes": int(arr.nbytes),
            }
        )
        offset = _aligned(offset + int(arr.nbytes))
    size = len(msgpack.packb({"meta": dict(meta), "tensors": entries}, use_bin_type=True))
    with ShardWriter(path, header_bytes=size) as writer:
        for name, arr in tensors.items():
            writer.add(name, arr)
        return writer.finish(meta)


def read_shard(path: str | Path) -> ShardData:
    """Memory-map a shard file.

    Returns:
        :class:`ShardData` whose tensors are read-only memmap views.

    Raises:
        ModelFileError: missing, truncated, wrong magic/version or inconsistent header.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise ModelFileError(f"shard {path} is truncated")
            magic, version, _flags, hlen = _PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise ModelFileError(f"{path} is not a potluck shard (magic {magic!r})")
            if version != FORMAT_VERSION:
                raise ModelFileError(f"shard {path} has format {version}, expected {FORMAT_VERSION}")
            if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > size:
                raise ModelFileError(f"shard {path} has a bad header length {hlen}")
            header = msgpack.unpackb(fh.read(hlen), raw=False, strict_map_key=True)
    except OSError as exc:
        raise ModelFileError(f"cannot read shard {path}: {exc}") from exc
    except (ValueError, msgpack.ExtraData) as exc:
        raise ModelFileError(f"shard {path} has a corrupt header: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
        raise ModelFileError(f"shard {path} header is not a map with 'meta'")
    data_start = _aligned(_PREFIX.size + hlen)
    tensors: dict[str, np.ndarray] = {}
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)
    for entry in header.get("tensors", []):
        try:
            name, dtype, shape = (
                str(entry["name"]),
                str(entry["dtype"]),
                tuple(int(d) for d in entry["shape"]),
            )
            offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"shard {path} has a malformed tensor entry: {exc}") from exc
        if dtype not in _DTYPES or any(d < 0 for d in shape):
            raise ModelFileError(f"shard {path}: tensor {name} has bad dtype/shape {dtype} {shape}")
        item = np.dtype(dtype).itemsize
        if int(np.prod(shape, dtype=np.int64)) * item != nbytes or offset < 0 or offset % ALIGN:
            raise ModelFileError(f"shard {path}: tensor {name} size/offset is inconsistent")
        start = data_start + offset
        if start + nbytes > size:
            raise ModelFileError(f"shard {path} is truncated (tensor {name} runs past the end)")
        tensors[name] = raw[start : start + nbytes].view(dtype).reshape(shape)
    return ShardData(meta=header["meta"], tensors=tensors, path=path)
