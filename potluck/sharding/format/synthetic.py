"""Random-weight GGUF files with a real model's geometry, streamed to disk (for big-model evidence).

A device pool that should run a 70B model can be tried before anyone downloads 40 GB: the file has
the geometry (hidden size, heads, KV heads, FFN width, vocabulary) and the tensor types of the real
thing, so memory, bandwidth and all-reduce costs are those of the real model; only the text it
writes is noise. llama.cpp loads it like any GGUF.

Weights: Q4_0 rows are drawn at random from a pool of rows quantized by ``gguf.quants`` from
Gaussian values (sd 0.02); Q4_K / Q6_K blocks are random bytes with float16 scales chosen to give
values of the same order (gguf cannot quantize K-quants). ``"q4_k_m"`` typing follows llama.cpp's
Q4_K_M mix in outline: Q4_K everywhere, Q6_K for ``attn_v`` and ``ffn_down`` of every other layer
and for the output head. Tensors are written one after another, and the big ones (embeddings, head,
FFN) in row chunks, so writing a 5 GB file holds about 64 MB in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, quants
from gguf import GGMLQuantizationType as QT

_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Geometry:
    """A llama-family model's shape.

    Attributes:
        hidden / layers / ffn / heads / kv_heads / vocab: the usual; ``ctx`` the trained context.
    """

    hidden: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    ctx: int = 4096
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


GEOMETRIES = {
    "tinyllama-1.1b": Geometry(2048, 22, 5632, 32, 4, 32000, 2048),
    "llama3-8b": Geometry(4096, 32, 14336, 32, 8, 128256, 8192, 500000.0),
    "llama3-70b": Geometry(8192, 80, 28672, 64, 8, 128256, 8192, 500000.0),
}
TYPINGS = ("q4_0", "q4_k_m")


class _Rows:
    """A tensor's bytes produced in row chunks: what ``GGUFWriter.write_tensor_data`` needs of an
    array (``nbytes``, ``tofile``), without the whole tensor in memory."""

    def __init__(self, rows: int, row_bytes: int, make: Callable[[int], np.ndarray]) -> None:
        self.rows, self.row_bytes, self.make = rows, row_bytes, make
        self.nbytes = rows * row_bytes

    def tofile(self, fh: BinaryIO) -> None:
        step = max(1, _CHUNK_BYTES // self.row_bytes)
        for start in range(0, self.rows, step):
            fh.write(self.make(min(step, self.rows - start)).tobytes())


def _pool(rng: np.random.Generator, qtype: QT, cols: int, rows: int = 64) -> np.ndarray:
    """``rows`` valid rows of ``qtype`` bytes for ``cols`` columns."""
    if qtype == QT.Q4_0:
        return quants.quantize(rng.normal(0, 0.02, (rows, cols)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    if qtype == QT.Q4_K:  # value d*sc*q - dmin*m, sc/m 6-bit, q 4-bit
        for at in (0, 2):
            raw[:, :, at : at + 2] = np.array([0.02 / (32 * 8)], np.float16).view(np.uint8)
    elif qtype == QT.Q6_K:  # value d*sc*(q-32), sc int8
        raw[:, :, 208:210] = np.array([0.02 / (64 * 16)], np.float16).view(np.uint8)
    else:
        raise ValueError(f"no random pool for {qtype.name}")
    return raw.reshape(rows, -1)


def _sampler(rng: np.random.Generator, pool: np.ndarray) -> Callable[[int], np.ndarray]:
    def draw(n: int) -> np.ndarray:
        return pool[rng.integers(0, pool.shape[0], n)]

    return draw


def tensor_plan(g: Geometry, typing: str) -> Iterator[tuple[str, tuple[int, int], QT]]:
    """``(name, (rows, cols), type)`` of every tensor, in file order (norms are F32 vectors: ``(1, n)``)."""
    if typing not in TYPINGS:
        raise ValueError(f"typing {typing!r} is not one of {', '.join(TYPINGS)}")
    base = QT.Q4_0 if typing == "q4_0" else QT.Q4_K
    more = QT.Q4_0 if typing == "q4_0" else QT.Q6_K
    hd = g.head_dim
    yield "token_embd.weight", (g.vocab, g.hidden), base
    for i in range(g.layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (1, g.hidden), QT.F32
        yield p + "attn_q.weight", (g.heads * hd, g.hidden), base
        yield p + "attn_k.weight", (g.kv_heads * hd, g.hidden), base
        yield p + "attn_v.weight", (g.kv_heads * hd, g.hidden), more if i % 2 == 0 else base
        yield p + "attn_output.weight", (g.hidden, g.heads * hd), base
        yield p + "ffn_norm.weight", (1, g.hidden), QT.F32
        yield p + "ffn_gate.weight", (g.ffn, g.hidden), base
        yield p + "ffn_up.weight", (g.ffn, g.hidden), base
        yield p + "ffn_down.weight", (g.hidden, g.ffn), more if i % 2 == 0 else base
    yield "output_norm.weight", (1, g.hidden), QT.F32
    yield "output.weight", (g.vocab, g.hidden), more


def write_random_gguf(
    path: Path,
    geometry: Geometry,
    typing: str = "q4_0",
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write a random-weight GGUF of ``geometry`` to ``path`` (via ``path.tmp``, renamed at the end).

    Args:
        typing: ``"q4_0"`` or ``"q4_k_m"`` (see the module docstring).
        progress: called with the bytes of each tensor as it is written.

    Returns:
        The file size, bytes.

    Raises:
        ValueError: an unknown typing, or a geometry whose widths are not multiples of 256.
    """
    g = geometry
    if any(x % 256 for x in (g.hidden, g.ffn, g.heads * g.head_dim)):
        raise ValueError("hidden, ffn and heads * head_dim must be multiples of 256 (K-quant super-blocks)")
    rng = np.random.default_rng(seed)
    plan = list(tensor_plan(g, typing))
    pools: dict[tuple[QT, int], np.ndarray] = {}
    tmp = path.with_name(path.name + ".tmp")
    w = GGUFWriter(str(tmp), "llama")
    w.add_name(f"potluck-random-{g.hidden}x{g.layers}-{typing}")
    w.add_context_length(g.ctx)
    w.add_embedding_length(g.hidden)
    w.add_block_count(g.layers)
    w.add_feed_forward_length(g.ffn)
    w.add_rope_dimension_count(g.head_dim)
    w.add_head_count(g.heads)
    w.add_head_count_kv(g.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(g.rope_theta)
    w.add_file_type(2 if typing == "q4_0" else 15)  # MOSTLY_Q4_0 / MOSTLY_Q4_K_M
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{i}" for i in range(g.vocab - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(g.vocab - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (g.vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for name, (rows, cols), qtype in plan:
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = rows * cols // block * size
        w.add_tensor_info(name, (rows, cols) if rows > 1 else (cols,), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, (rows, cols), qtype in plan:
        if qtype == QT.F32:
            w.write_tensor_data(np.ones(cols, np.float32))
            if progress:
                progress(cols * 4)
            continue
        pool = pools.get((qtype, cols))
        if pool is None:
            pool = pools[(qtype, cols)] = _pool(rng, qtype, cols)
        rows_of = _Rows(rows, pool.shape[1], _sampler(rng, pool))
        w.write_tensor_data(rows_of)  # type: ignore[arg-type]  # duck-typed: nbytes + tofile
        if progress:
            progress(rows_of.nbytes)
    w.close()
    tmp.replace(path)
    return path.stat().st_size
