"""Other model families than llama on the TP engine, against llama.cpp on the same F32 GGUF.

The files are made by :func:`tests.sharding.arch_fixtures.retarget` from the tinyshakespeare
fixture (llama.cpp loads them as that architecture).
"""

from __future__ import annotations

import pytest

from potluck.routing.request import SamplingParams
from potluck.sharding.format.gguf_tensors import open_gguf, read_config
from potluck.sharding.orchestration.group import generate_ids
from tests.sharding.arch_fixtures import retarget
from tests.sharding.compute.test_equivalence import group
from tests.sharding.llama_ref import greedy_tokens


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory, shared_dir):
    src = shared_dir / "models" / "tinyshakespeare-f32.gguf"
    return retarget(src, tmp_path_factory.mktemp("qwen2") / "qwen2-f32.gguf", "qwen2")


def test_qwen2_config_has_qkv_bias_and_neox_rope(qwen2_path) -> None:
    config = read_config(open_gguf(qwen2_path))
    assert config.architecture == "qwen2" and config.qkv_bias
    assert config.rope_mode == "neox"


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_qwen2_greedy_tokens_equal_llama_cpp(qwen2_path, n) -> None:
    prompt_ids, want = greedy_tokens(qwen2_path)
    assert len(set(want)) > 10  # the biases leave a model that still says varied things
    g = group(qwen2_path, n)
    try:
        got = list(generate_ids(g, prompt_ids, SamplingParams(max_tokens=48, temperature=0.0), set()))
    finally:
        g.close()
    assert got == want
