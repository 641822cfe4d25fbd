"""Other model families than llama on the TP engine, against llama.cpp on the same F32 GGUF.

The files are made by :func:`tests.sharding.arch_fixtures.retarget` from the tinyshakespeare
fixture (llama.cpp loads them as that architecture): qwen2 (Q/K/V biases, NEOX RoPE), qwen3 (per-head
Q/K RMSNorm) and gemma3 (embedding scale, Q/K norms, post-norms, GeGLU, sliding-window layers with
their own RoPE base; the window is 16 tokens, so the 18-token prompt plus 48 generated cross it).
"""

from __future__ import annotations

import pytest

from potluck.sharding.format.gguf_tensors import open_gguf, read_config
from tests.sharding.arch_fixtures import retarget
from tests.sharding.compute.test_equivalence import tp_greedy
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
