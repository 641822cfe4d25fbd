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

MAGIC = b"PLKSHRD\0"
FORMAT_VERSION = 1
ALIGN = 64
MAX_HEADER_BYTES = 64 << 20
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


def write_shard(path: str | Path, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> int:
    """Write a shard file atomically (temp file + rename).

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
    path = Path(path)
    entries: list[dict[str, Any]] = []
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype.name not in _DTYPES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} not storable")
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
    header = msgpack.packb({"meta": dict(meta), "tensors": entries}, use_bin_type=True)
    data_start = _aligned(_PREFIX.size + len(header))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open("wb") as fh:
            fh.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)))
            fh.write(header)
            for entry, arr in zip(entries, tensors.values(), strict=False):
                fh.seek(data_start + entry["offset"])
                fh.write(np.ascontiguousarray(arr).tobytes(order="C"))
            fh.truncate(data_start + offset)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return data_start + offset


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
