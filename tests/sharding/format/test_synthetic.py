"""Random-weight GGUFs of a real geometry: the tensors and types llama.cpp expects, streamed."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from potluck.sharding.format.gguf_tensors import open_gguf, read_config, tensor_map
from potluck.sharding.format.synthetic import GEOMETRIES, Geometry, write_random_gguf

SMALL = Geometry(hidden=512, layers=2, ffn=1024, heads=8, kv_heads=2, vocab=1024, ctx=256)


@pytest.mark.parametrize(("typing", "types"), [("q4_0", {QT.Q4_0, QT.F32}), ("q4_k_m", {QT.Q4_K, QT.Q6_K, QT.F32})])
def test_the_file_has_the_geometry_and_llama_cpp_runs_it(tmp_path, typing, types) -> None:
    from llama_cpp import Llama

    path = tmp_path / "m.gguf"
    size = write_random_gguf(path, SMALL, typing)
    assert size == path.stat().st_size and not list(tmp_path.glob("*.tmp"))
    reader = open_gguf(path)
    config = read_config(reader)
    assert (config.hidden, config.n_layers, config.ffn, config.n_heads, config.n_kv_heads, config.vocab) == (
        512, 2, 1024, 8, 2, 1024,
    )  # fmt: skip
    t = tensor_map(reader)
    assert {QT(x.tensor_type) for x in t.values()} == types
    assert QT(t["blk.0.attn_v.weight"].tensor_type) == (QT.Q6_K if typing == "q4_k_m" else QT.Q4_0)
    llm = Llama(model_path=str(path), n_ctx=32, n_threads=1, verbose=False)
    try:
        # loading and evaluating is the point; random weights give no meaningful logits to compare
        # (and a tiny random K-quant model has produced overflowing ones now and then)
        for token in (1, 300, 400):
            llm.eval([token])
        assert llm.n_vocab() == 1024 and np.asarray(llm.scores[2]).shape == (1024,)
    finally:
        llm.close()


def test_bad_requests_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="typing"):
        write_random_gguf(tmp_path / "x.gguf", SMALL, "q3_xs")
    with pytest.raises(ValueError, match="multiples of 256"):
        write_random_gguf(tmp_path / "x.gguf", Geometry(500, 1, 1024, 5, 1, 1024), "q4_0")
    assert GEOMETRIES["llama3-70b"].head_dim == 128
