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


def retarget(src: Path, dst: Path, arch: str, seed: int = 0, sliding_window: int = 16) -> Path:
    """Write ``src`` (an F32 llama GGUF) as architecture ``arch`` to ``dst``; returns ``dst``.

    Qwen2 gets Q/K/V biases; Qwen3 and Gemma 3 per-head Q/K norms; Gemma 3 also post-norms and
    a ``sliding_window`` (small, so that a short prompt already meets it). New norm weights are
    ``1 + N(0, 0.1)``, biases ``N(0, 0.05)``.
    """
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
    if arch == "gemma3":
        writer.add_uint32("gemma3.attention.sliding_window", sliding_window)
    head_dim = int(reader.fields[f"{old}.rope.dimension_count"].contents())
    hidden = int(reader.fields[f"{old}.embedding_length"].contents())
    rng = np.random.default_rng(seed)

    def norm(width: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(width) * 0.1).astype(np.float32)

    for tensor in reader.tensors:
        data = np.asarray(tensor.data, np.float32)
        writer.add_tensor(tensor.name, data)
        kind = tensor.name.split(".")[-2]
        if arch == "qwen2" and kind in ("attn_q", "attn_k", "attn_v"):
            bias = (rng.standard_normal(data.shape[0]) * 0.05).astype(np.float32)
            writer.add_tensor(tensor.name.replace(".weight", ".bias"), bias)
        if arch in ("qwen3", "gemma3") and kind in ("attn_q", "attn_k"):
            writer.add_tensor(tensor.name.replace(".weight", "_norm.weight"), norm(head_dim))
        if arch == "gemma3" and kind in ("attn_output", "ffn_down"):
            post = "post_attention_norm" if kind == "attn_output" else "post_ffw_norm"
            writer.add_tensor(tensor.name.replace(kind, post), norm(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
