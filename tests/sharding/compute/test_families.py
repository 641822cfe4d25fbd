"""Other model families than llama on the TP engine, against llama.cpp on the same F32 GGUF.

The files are made by :func:`tests.sharding.arch_fixtures.retarget` from the tinyshakespeare
fixture (llama.cpp loads them as that architecture): qwen2 (Q/K/V biases, NEOX RoPE), qwen3 (per-head
Q/K RMSNorm) and gemma3 (embedding scale, Q/K norms, post-norms, GeGLU, sliding-window layers with
their own RoPE base; the window is 16 tokens, so the 18-token prompt plus 48 generated cross it).
"""

from __future__ import annotations

import numpy as np
import pytest

from potluck.errors import ShardPlanError
from potluck.sharding.format.gguf_tensors import open_gguf, read_config
from tests.sharding.arch_fixtures import retarget
from tests.sharding.compute.test_equivalence import group, tp_greedy
from tests.sharding.llama_ref import greedy_tokens

FAMILIES = ("qwen2", "qwen3", "gemma3")


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory, shared_dir):
    src = shared_dir / "models" / "tinyshakespeare-f32.gguf"
    out = tmp_path_factory.mktemp("families")
    return {arch: retarget(src, out / f"{arch}-f32.gguf", arch) for arch in FAMILIES}


def test_family_configs(family_paths) -> None:
    qwen2, qwen3, gemma3 = (read_config(open_gguf(family_paths[a])) for a in FAMILIES)
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.rope_mode == "neox"
    assert qwen3.qk_norm and not qwen3.qkv_bias and not qwen3.post_norms
    assert gemma3.qk_norm and gemma3.post_norms and gemma3.ffn_act == "gelu"
    assert gemma3.embed_scale == pytest.approx(16.0) and gemma3.sliding_window == 16
    assert [gemma3.is_local(i) for i in range(7)] == [True] * 5 + [False, True]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_family_greedy_tokens_equal_llama_cpp(family_paths, arch, n) -> None:
    path = family_paths[arch]
    prompt_ids, want = greedy_tokens(path)
    assert len(set(want)) > 10  # the retargeted model still says varied things
    assert tp_greedy(path, n, prompt_ids, len(want)) == want


def _chunked_logits(path, n: int, ids: list[int], attention: str, cut: int):  # type: ignore[no-untyped-def]
    """Teacher-forced logits of ``ids`` in two passes (``ids[:cut]``, then the rest over the cache)."""
    g = group(path, n, attention=attention)
    try:
        head = g.master.forward(ids[:cut], 0, all_logits=True)
        tail = g.master.forward(ids[cut:], cut, all_logits=True)
    finally:
        g.close()
    return np.concatenate([head, tail])


@pytest.mark.parametrize("arch", ("llama", *FAMILIES))
@pytest.mark.parametrize("n", [1, 2])
def test_fused_attention_computes_what_the_exact_block_does(family_paths, shared_dir, arch, n) -> None:
    """GroupQueryAttention (float16 RoPE and cache) against llama.cpp's bit-exact block on the F32 files:
    RoPE modes, Q/K norms, QKV biases, and gemma3's sliding window (16 tokens; the 66 positions cross
    it, and the second pass attends over the cache written by the first)."""
    path = family_paths.get(arch, shared_dir / "models" / "tinyshakespeare-f32.gguf")
    prompt_ids, want = greedy_tokens(path)
    ids = [*prompt_ids, *want]
    exact = _chunked_logits(path, n, ids, "exact", 23)
    fused = _chunked_logits(path, n, ids, "fused", 23)
    diff = float(np.abs(fused - exact).max())
    agree = float((fused.argmax(1) == exact.argmax(1)).mean())
    print(f"{arch} N={n}: max |logit diff| {diff:.4f}, top-1 agreement {agree:.4f} over {len(ids)} positions")
    assert diff < 0.03
    assert agree >= 0.98


def test_an_unknown_attention_mode_is_refused(shared_dir) -> None:
    with pytest.raises(ShardPlanError, match="attention 'flash' is not one of exact, fused"):
        group(shared_dir / "models" / "tinyshakespeare-f32.gguf", 1, attention="flash")
