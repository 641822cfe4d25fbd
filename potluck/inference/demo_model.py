"""A small demo model potluck writes itself, so a node with no model and no network still answers.

Llama architecture (hidden 256, 4 layers, 8 query heads, 4 KV heads, SwiGLU FFN 768, context
2048), F16 weights drawn from a seeded normal distribution, and a byte-level sentencepiece vocab
(``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens ``<0x00>``..``<0xFF>`` and ``▁`` for the space),
written with the ``gguf`` package as a real GGUF that llama.cpp loads like any other (~6.7 MB).
The weights are random: the text it produces is gibberish. It exists to prove the pipeline.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

log = logging.getLogger(__name__)

DEMO_NAME = "potluck-demo-v1"
SEED = 20261121
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 256, 4, 8, 4, 768, 2048
N_SPECIAL, N_BYTES = 3, 256
SPACE_TOKEN = N_SPECIAL + N_BYTES  # "▁"
VOCAB = SPACE_TOKEN + 1


def _vocab() -> tuple[list[bytes], list[float], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{b:02X}>".encode() for b in range(N_BYTES)] + ["▁".encode()]
    scores = [0.0] * N_SPECIAL + [0.0] * N_BYTES + [-1.0]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * N_BYTES
    types.append(TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tensors in numpy (out_features, in_features) order; GGUF stores the reverse."""

    def mat(rows: int, cols: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float16)

    head_dim = HIDDEN // HEADS
    w: dict[str, np.ndarray] = {"token_embd.weight": mat(VOCAB, HIDDEN, 1.0)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = np.ones(HIDDEN, np.float32)
        w[p + "attn_q.weight"] = mat(HEADS * head_dim, HIDDEN)
        w[p + "attn_k.weight"] = mat(KV_HEADS * head_dim, HIDDEN)
        w[p + "attn_v.weight"] = mat(KV_HEADS * head_dim, HIDDEN)
        w[p + "attn_output.weight"] = mat(HIDDEN, HEADS * head_dim)
        w[p + "ffn_norm.weight"] = np.ones(HIDDEN, np.float32)
        w[p + "ffn_gate.weight"] = mat(FFN, HIDDEN)
        w[p + "ffn_up.weight"] = mat(FFN, HIDDEN)
        w[p + "ffn_down.weight"] = mat(HIDDEN, FFN)
    w["output_norm.weight"] = np.ones(HIDDEN, np.float32)
    # Output head: printable ASCII bytes and the space get large random rows, every other token a
    # zero row (logit 0), so sampling mostly yields readable characters.
    out = np.zeros((VOCAB, HIDDEN), np.float16)
    readable = [N_SPECIAL + b for b in range(0x20, 0x7F)] + [N_SPECIAL + 0x0A, SPACE_TOKEN]
    out[readable] = mat(len(readable), HIDDEN, 0.5)
    w["output.weight"] = out
    return w


def write_demo_model(path: Path, chat_template: str | None = None) -> Path:
    """Write the demo GGUF to ``path`` (atomically; same bytes every time).

    Args:
        path: destination file.
        chat_template: Jinja chat template to store as ``tokenizer.chat_template`` (none by default).

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(DEMO_NAME)
    writer.add_description("potluck demo model: random weights, for smoke tests only")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, tensor in _weights(np.random.default_rng(SEED)).items():
        raw_dtype = GGMLQuantizationType.F16 if tensor.dtype == np.float16 else GGMLQuantizationType.F32
        writer.add_tensor(name, tensor, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def demo_model_path(cache_dir: Path) -> Path:
    """The demo model in ``cache_dir``, written on first use."""
    path = cache_dir / "demo" / f"{DEMO_NAME}.gguf"
    if not path.is_file():
        log.info("writing the demo model to %s", path)
        write_demo_model(path)
    return path
