"""Validate and summarize GGUF files before any engine touches them.

Checks follow the GGUF spec (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): the
``GGUF`` magic, a supported version (2 or 3), a header that parses, and every tensor's data lying
inside the file. A file that fails gets a :class:`~potluck.errors.ModelFileError` saying what is
wrong and what to do, instead of a crash deep inside llama.cpp.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from potluck.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_MIN_SIZE = 24  # magic + version + tensor count + kv count


@dataclass(frozen=True)
class GGUFSummary:
    """What a GGUF file holds.

    Attributes:
        architecture: ``general.architecture``.
        name: ``general.name`` or the file stem.
        n_layers: ``<arch>.block_count``.
        context_length: ``<arch>.context_length`` (tokens).
        n_params: total tensor elements.
        quantization: tensor type holding the most bytes among 2-D tensors (``Q4_0``, ``F16``...).
        chat_template: ``tokenizer.chat_template`` or ``None``.
        size_bytes: file size.
    """

    architecture: str
    name: str
    n_layers: int
    context_length: int
    n_params: int
    quantization: str
    chat_template: str | None
    size_bytes: int


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """Scalar or string value of a GGUF metadata key, or ``default`` when it is absent."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if isinstance(value, np.ndarray) else value


def _check_header(path: Path) -> int:
    if not path.exists():
        raise ModelFileError(f"model file {path} does not exist; check the path or run `potluck models list`")
    if not path.is_file():
        raise ModelFileError(f"model path {path} is not a file")
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc}") from exc
    if len(head) < 4 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file (magic {head[:4]!r}, expected b'GGUF'); "
            "potluck runs GGUF models: convert with llama.cpp's convert_hf_to_gguf.py"
        )
    if size < _MIN_SIZE:
        raise ModelFileError(f"{path} is truncated ({size} bytes): download it again")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"{path} is GGUF version {version}; supported: {SUPPORTED_VERSIONS}")
    return size


def inspect_gguf(path: Path) -> GGUFSummary:
    """Validate ``path`` and summarize it.

    Raises:
        ModelFileError: missing, unreadable, not GGUF, unsupported version, truncated or
            with a malformed header.
    """
    size = _check_header(path)
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, struct.error, OSError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{path} has a malformed or truncated GGUF header ({type(exc).__name__}: {exc}); download it again"
        ) from exc
    by_type: Counter[str] = Counter()
    n_params = 0
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelFileError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte {end} but the file has {size}; "
                "download it again"
            )
        n_params += int(tensor.n_elements)
        if len(tensor.shape) >= 2:
            by_type[GGMLQuantizationType(tensor.tensor_type).name] += int(tensor.n_bytes)
    arch = str(field_value(reader, "general.architecture") or "unknown")
    name = str(field_value(reader, "general.name") or path.stem)
    return GGUFSummary(
        architecture=arch,
        name=name,
        n_layers=int(field_value(reader, f"{arch}.block_count") or 0),
        context_length=int(field_value(reader, f"{arch}.context_length") or 0),
        n_params=n_params,
        quantization=by_type.most_common(1)[0][0] if by_type else "unknown",
        chat_template=field_value(reader, "tokenizer.chat_template"),
        size_bytes=size,
    )
