"""Continuous batching on real llama.cpp (BatchEngine through BatchedLlamaCppBackend).

The reference is llama-cpp-python's ``Llama.generate`` on the same GGUF (greedy), and each
stream's own solo output: decoding together must not change any stream's tokens.
"""

from __future__ import annotations

import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from potluck.errors import RequestError
from potluck.inference.batched_backend import BatchedLlamaCppBackend
from potluck.inference.llamacpp import LlamaCppBackend
from potluck.routing.request import SamplingParams
from tests.conftest import MODELS, SHARED
from tests.helpers import until

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
PROMPTS = {
    "f16": ["ROMEO:\nBut soft, what light", "JULIET:\nO Romeo", "KING HENRY:\nOnce more", "First Citizen:\n"],
    "smollm2": ["The capital of France is", "Once upon a time", "def fib(n):", "1, 2, 3, 4,"],
}


def smollm2_path() -> Path:
    out = subprocess.run([str(SHARED / "scripts" / "real-models")], capture_output=True, text=True, check=True)
    return Path(dict(line.split(maxsplit=1) for line in out.stdout.splitlines())["smollm2-q4_1"])


@pytest.fixture(scope="module", params=["f16", "smollm2"])
def model(request):
    path = MODELS / "tinyshakespeare-f16.gguf" if request.param == "f16" else smollm2_path()
    backend = BatchedLlamaCppBackend(path, request.param, n_ctx=256, n_threads=2, n_slots=4)
    backend.load()
    yield request.param, backend
    backend.close()


@pytest.fixture(scope="module")
def f16():
    backend = BatchedLlamaCppBackend(MODELS / "tinyshakespeare-f16.gguf", "ts", n_ctx=256, n_threads=2, n_slots=2)
    backend.load()
    yield backend
    backend.close()


def ids(backend, prompt: str, params: SamplingParams = GREEDY, cancel: threading.Event | None = None) -> list[int]:
    return [t.token_id for t in backend.generate(prompt, params, cancel or threading.Event()) if t.token_id >= 0]


def llama_generate(backend: BatchedLlamaCppBackend, prompt: str, n: int) -> list[int]:
    """Greedy tokens from llama-cpp-python's own ``Llama.generate`` on the same weights."""
    import llama_cpp

    llm = backend._llm
    llm.reset()
    out: list[int] = []
    for token in llm.generate(backend.tokenize(prompt), temp=0.0, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == n:
            break
        out.append(token)
    return out


def concurrently(fn, args: list) -> list:
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(fn, args))


def test_greedy_solo_and_concurrent_streams_equal_llama_generate(model):
    name, backend = model
    prompts = PROMPTS[name]
    reference = [llama_generate(backend, p, GREEDY.max_tokens) for p in prompts]
    solo = [ids(backend, p) for p in prompts]
    assert solo == reference
    steps = backend.engine.steps
    together = concurrently(lambda p: ids(backend, p), prompts)
    assert together == solo
    # They did share batches: fewer decode steps than one stream after another would need.
    assert backend.engine.max_batch_seqs >= 2
    assert backend.engine.steps - steps < sum(len(s) for s in solo)


def test_seeded_sampling_is_per_sequence(model):
    _, backend = model
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=1234)
    prompts = PROMPTS[model[0]][:3]
    solo = [ids(backend, p, params) for p in prompts]
    assert concurrently(lambda p: ids(backend, p, params), prompts) == solo


def test_request_joins_a_running_batch(f16):
    long_params = SamplingParams(max_tokens=200, temperature=0.0)
    long_solo = ids(f16, "ROMEO:", long_params)
    short_solo = ids(f16, "JULIET:\nO Romeo")
    assert len(long_solo) > 100
    seen_both = False
    long_out: list[int] = []
    for n, token in enumerate(f16.generate("ROMEO:", long_params, threading.Event())):
        long_out.append(token.token_id)
        if n == 0:  # the long stream is decoding: a second request joins it
            short = ThreadPoolExecutor(1).submit(ids, f16, "JULIET:\nO Romeo")
        seen_both = seen_both or f16.engine.busy_slots == 2
    assert short.result() == short_solo
    assert [t for t in long_out if t >= 0] == long_solo
    assert seen_both and f16.engine.max_batch_seqs == 2


def test_cancelled_request_leaves_and_frees_its_slot(f16):
    params = SamplingParams(max_tokens=200, temperature=0.0)
    third_solo = ids(f16, "KING HENRY:\nOnce more", params)
    cancel_a = threading.Event()
    a_out: list[int] = []
    b_iter = f16.generate("JULIET:\nO Romeo", params, threading.Event())
    next(b_iter)  # b holds a slot and is decoding
    a_iter = f16.generate("ROMEO:", params, cancel_a)
    a_out.append(next(a_iter).token_id)  # both slots are taken
    assert f16.engine.busy_slots == 2
    third = ThreadPoolExecutor(1).submit(ids, f16, "KING HENRY:\nOnce more", params)  # waits for a slot
    cancel_a.set()
    a_out += [t.token_id for t in a_iter]  # a ends soon after its cancel, well before 200 tokens
    assert len(a_out) < 200
    assert third.result() == third_solo  # it got a's slot
    b_iter.close()  # a consumer that stops reading also leaves
    until(lambda: f16.engine.busy_slots == 0, 10, "every sequence to leave")


def test_grammar_and_logprobs_per_sequence_in_a_mixed_batch(model):
    name, backend = model
    grammar = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    constrained = SamplingParams(max_tokens=16, temperature=0.0, grammar=grammar, logprobs=3)
    plain = SamplingParams(max_tokens=16, temperature=0.0)
    prompts = PROMPTS[name]
    solo_plain = [ids(backend, p, plain) for p in prompts[1:]]

    def run(job):
        prompt, params = job
        return list(backend.generate(prompt, params, threading.Event()))

    jobs = [(prompts[0], constrained)] + [(p, plain) for p in prompts[1:]]
    out = concurrently(run, jobs)
    text = "".join(t.text for t in out[0])
    assert re.fullmatch(r"(yes|no) [0-9][0-9]", text), text
    model_tokens = [t for t in out[0] if t.token_id >= 0]
    assert all(t.logprob is not None and len(t.logprob.top) == 3 for t in model_tokens)
    assert all(t.logprob is None for s in out[1:] for t in s)
    assert [[t.token_id for t in s if t.token_id >= 0] for s in out[1:]] == solo_plain
    # The same numbers as the single-sequence llama.cpp path (Llama.generate + llama_get_logits_ith), up to
    # the float rounding of a matmul over a batch of several sequences (about 1e-4 here).
    ref = [t for t in LlamaCppBackend.generate(backend, prompts[0], constrained, threading.Event()) if t.token_id >= 0]
    assert [t.token_id for t in ref] == [t.token_id for t in model_tokens]
    for ours, theirs in zip(model_tokens, ref, strict=True):
        assert ours.logprob.logprob == pytest.approx(theirs.logprob.logprob, abs=2e-3)
        assert [a.token for a in ours.logprob.top] == [a.token for a in theirs.logprob.top]


def test_bad_grammar_fails_only_its_request(f16):
    bad = SamplingParams(max_tokens=4, temperature=0.0, grammar="root ::= (")
    with pytest.raises(RequestError) as err:
        ids(f16, "ROMEO:", bad)
    assert err.value.param == "grammar"
    assert ids(f16, "ROMEO:") == ids(f16, "ROMEO:")  # the engine keeps serving


def test_too_long_prompt_is_refused(f16):
    with pytest.raises(RequestError):
        ids(f16, "x " * 400)


def test_decode_speed_is_measured_at_load(f16):
    assert f16.decode_tps > 0
