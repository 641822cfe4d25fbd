"""llama.cpp references for the equivalence tests (llama-cpp-python from the project's .venv)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

STEADY_PROMPT = "ROMEO:\nBut soft, what light"
#: Public-domain text (Romeo and Juliet II.ii) for teacher forcing: > 128 tokens with the fixture tokenizer.
PASSAGE = """ROMEO:
But soft, what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green
And none but fools do wear it; cast it off.
It is my lady, O, it is my love!
"""


def _llama(path: Path, logits_all: bool = False):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    return Llama(
        model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=logits_all, verbose=False, seed=0
    )


@cache
def greedy_tokens(path: Path, prompt: str = STEADY_PROMPT, n: int = 48) -> tuple[list[int], list[int]]:
    """(prompt ids, llama.cpp's first ``n`` greedy tokens)."""
    llm = _llama(path)
    ids = llm.tokenize(prompt.encode(), add_bos=True)
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) >= n:
            break
    llm.close()
    return list(ids), out


@cache
def teacher_forced_logits(path: Path, n_positions: int = 128) -> tuple[list[int], np.ndarray]:
    """(the passage's first ``n_positions`` ids, llama.cpp logits float32 ``(n_positions, vocab)``)."""
    llm = _llama(path, logits_all=True)
    ids = llm.tokenize(PASSAGE.encode(), add_bos=True)[:n_positions]
    assert len(ids) == n_positions, "passage too short"
    llm.eval(ids)
    logits = np.array(llm.scores[:n_positions], dtype=np.float32)
    llm.close()
    return list(ids), logits
