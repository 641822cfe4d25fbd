"""Read a llama-family GGUF for the tensor-parallel engine: model geometry and raw tensor rows.

Metadata keys follow the GGUF spec (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md,
"LLM" section: ``<arch>.embedding_length``, ``<arch>.attention.head_count_kv``,
``<arch>.rope.freq_base``, ``<arch>.rope.scaling.type``...). Tensor names are llama.cpp's
(``blk.N.attn_q.weight``...). A GGUF 2-D tensor of shape ``[ne0, ne1]`` is stored row-major as
``ne1`` rows of ``ne0`` elements: rows are *output* features, so ``y = x @ W.T`` with
``W`` of shape ``(out, in)``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor

from potluck.errors import ModelFileError
from potluck.inference.gguf_file import field_value

log = logging.getLogger(__name__)

#: Architectures the engine runs, with their RoPE mode (llama.cpp ``LLAMA_ROPE_TYPE_*``):
#: "normal" rotates adjacent pairs (2i, 2i+1); "neox" rotates (i, i + d/2).
SUPPORTED_ARCHS: dict[str, str] = {
    "llama": "normal",
    "mistral": "normal",
    "qwen2": "neox",
    "qwen3": "neox",
    "gemma3": "neox",
}
#: Gemma 3: every 6th layer attends globally, the others within the sliding window (llama.cpp
#: ``set_swa_pattern(6)``), and local layers use RoPE base 10000 (``rope_freq_base_train_swa``).
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    """Geometry and hyper-parameters of a llama-family model.

    Attributes:
        architecture: GGUF ``general.architecture``.
        n_layers: transformer blocks.
        hidden: embedding width ``d_model``.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA groups); ``n_heads % n_kv_heads == 0``.
        head_dim: per-head width (``hidden / n_heads`` unless the file says otherwise).
        ffn: SwiGLU intermediate width.
        vocab: vocabulary size (rows of ``token_embd``).
        rms_eps: RMSNorm epsilon.
        rope_theta: RoPE frequency base.
        rope_freq_scale: position multiplier (``1 / factor`` for linear rope scaling, else 1).
        rope_mode: ``"normal"`` or ``"neox"``.
        context_length: trained context in tokens.
        qkv_bias: whether Q/K/V carry biases (Qwen2).
        tied_embeddings: no ``output.weight``; the head reuses ``token_embd``.
        embed_scale: token embeddings are multiplied by this (Gemma: ``sqrt(hidden)``).
        qk_norm: per-head RMSNorm of Q and K before RoPE (``attn_q_norm``/``attn_k_norm``; Qwen3, Gemma 3).
        post_norms: RMSNorm of the attention and FFN outputs before the residual adds
            (``post_attention_norm``/``post_ffw_norm``; Gemma 3).
        ffn_act: gated FFN activation, ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, tanh approximation).
        sliding_window: tokens a local layer attends back (0: none).
        swa_pattern: layer ``L`` is local when ``L % swa_pattern < swa_pattern - 1`` (0: none).
        rope_theta_local: RoPE base of the local layers.
    """

    architecture: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_freq_scale: float
    rope_mode: str
    context_length: int
    qkv_bias: bool
    tied_embeddings: bool
    embed_scale: float = 1.0
    qk_norm: bool = False
    post_norms: bool = False
    ffn_act: str = "silu"
    sliding_window: int = 0
    swa_pattern: int = 0
    rope_theta_local: float = 10000.0

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` attends only within :attr:`sliding_window` (Gemma 3's local layers)."""
        return bool(self.sliding_window and self.swa_pattern) and layer % self.swa_pattern < self.swa_pattern - 1

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)


def open_gguf(path: str | Path) -> GGUFReader:
    """Memory-map a GGUF file.

    Raises:
        ModelFileError: missing or unparsable file.
    """
    try:
        return GGUFReader(str(path), "r")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFileError(f"cannot read GGUF {path}: {exc}") from exc


def read_config(reader: GGUFReader) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF.

    Raises:
        ModelFileError: unsupported architecture or missing/inconsistent metadata.
    """
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(
            f"architecture {arch!r} is not supported by the tensor-parallel engine "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )

    def need(key: str) -> Any:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ModelFileError(f"GGUF metadata {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    hidden = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(field_value(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = int(field_value(reader, f"{arch}.attention.key_length", hidden // n_heads))
    rope_dim = int(field_value(reader, f"{arch}.rope.dimension_count", head_dim))
    if n_heads % n_kv or rope_dim != head_dim:
        raise ModelFileError(f"unsupported head layout: {n_heads} heads, {n_kv} KV heads, rope dim {rope_dim}")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelFileError("GGUF has no token_embd.weight")
    scale_type = field_value(reader, f"{arch}.rope.scaling.type", "none")
    freq_scale = 1.0
    if scale_type == "linear":
        freq_scale = 1.0 / float(field_value(reader, f"{arch}.rope.scaling.factor", 1.0))
    elif scale_type not in ("none", None):
        raise ModelFileError(f"rope scaling type {scale_type!r} is not supported (only linear)")
    return ModelConfig(
        architecture=str(arch),
        n_layers=int(need("block_count")),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=int(need("feed_forward_length")),
        vocab=int(embd.shape[1]),
        rms_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_freq_scale=freq_scale,
        rope_mode=SUPPORTED_ARCHS[str(arch)],
        context_length=int(field_value(reader, f"{arch}.context_length", 2048)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tied_embeddings="output.weight" not in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        **(_gemma3(reader, hidden) if arch == "gemma3" else {}),
    )


def _gemma3(reader: GGUFReader, hidden: int) -> dict[str, Any]:
    """Gemma 3's extras (llama.cpp ``llm_build_gemma3_iswa``): embeddings scaled by ``sqrt(hidden)``,
    post-norms, GeGLU, and interleaved sliding-window layers with their own RoPE base."""
    return {
        "embed_scale": float(np.sqrt(np.float32(hidden))),
        "post_norms": True,
        "ffn_act": "gelu",
        "sliding_window": int(field_value(reader, "gemma3.attention.sliding_window", 0)),
        "swa_pattern": GEMMA3_SWA_PATTERN,
        "rope_theta_local": GEMMA3_LOCAL_ROPE_BASE,
    }


def tensor_map(reader: GGUFReader) -> dict[str, ReaderTensor]:
    """Tensors of a GGUF by name."""
    return {t.name: t for t in reader.tensors}


def row_bytes(tensor: ReaderTensor) -> int:
    """Bytes of one row (``ne0`` elements) in the tensor's storage type."""
    block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    return int(tensor.shape[0]) // block * type_size


def raw_rows(tensor: ReaderTensor) -> np.ndarray:
    """The tensor's rows as stored: ``(rows, ne0)`` for F32/F16, ``(rows, row_bytes)`` uint8 otherwise.

    The result is a view into the memory-mapped file (no copy).
    """
    data = tensor.data
    n_rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.reshape(n_rows, int(tensor.shape[0]))
    return data.view(np.uint8).reshape(n_rows, row_bytes(tensor))


def bytes_per_element(tensor: ReaderTensor) -> float:
    """Average storage bytes per weight element (e.g. 18/32 for Q4_0)."""
    block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    return type_size / block
