"""Small F32 GGUFs of other architectures, made from the tinyshakespeare fixture.

:func:`retarget` copies the fixture's tokenizer, hyperparameters and weights under another
``general.architecture`` and adds what that architecture needs (Qwen2: Q/K/V biases, drawn at
random with a fixed seed). The weights are not trained for the new architecture's RoPE layout, so
the text is not Shakespeare; what the tests check is that the TP engine computes what llama.cpp
computes for that architecture on the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

_SKIP = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}


def retarget(src: Path, dst: Path, arch: str, seed: int = 0) -> Path:
    """Write ``src`` (an F32 llama GGUF) as architecture ``arch`` to ``dst``; returns ``dst``."""
    reader = GGUFReader(src)
    old = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name in _SKIP:
            continue
        key = arch + name[len(old) :] if name.startswith(old + ".") else name
        value = field.contents()
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, main)
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data, np.float32)
        writer.add_tensor(tensor.name, data)
        if arch == "qwen2" and tensor.name.split(".")[-2] in ("attn_q", "attn_k", "attn_v"):
            bias = (rng.standard_normal(data.shape[0]) * 0.05).astype(np.float32)
            writer.add_tensor(tensor.name.replace(".weight", ".bias"), bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
