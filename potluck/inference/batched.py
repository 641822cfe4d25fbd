"""Continuous batching on llama.cpp: concurrent sequences decode together in one ``llama_batch``.

One decode thread owns a llama.cpp context with ``n_slots`` KV-cache sequences (``n_seq_max``,
one stream of ``n_ctx`` cells per sequence, ``kv_unified=False``). Each step it

1. drops sequences that were cancelled or abandoned (``llama_memory_seq_rm``) and admits waiting
   ones into free slots;
2. builds one batch: the last sampled token of every decoding sequence, then prompt tokens of
   sequences still in prefill (chunked so the batch holds at most ``n_batch`` tokens), with
   logits requested only where a token will be sampled;
3. runs ``llama_decode`` once and samples each sequence from its own output row with its own
   :class:`~potluck.inference.sampler_chain.SamplerChain` (grammar, seed), computing logprobs
   from the raw logits row when asked (:func:`potluck.inference.logprobs.token_logprobs`).

A request joins at the next step and leaves as soon as it ends, so a long generation never holds
up a short one. This is the scheme of llama.cpp's own server (``tools/server/server.cpp``,
``update_slots``). Decode speed is measured on the way (:attr:`BatchEngine.decode_tps`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from potluck.errors import GenerationError, ModelError, PotluckError
from potluck.inference.logprobs import token_logprobs
from potluck.inference.sampler_chain import SamplerChain
from potluck.routing.request import SamplingParams
from potluck.routing.route import TokenLogprob
from potluck.tasks import Failure

log = logging.getLogger(__name__)

_END = object()
# How often the thread policy is asked for a thread count while decoding, seconds.
_THREAD_CHECK_S = 1.0
# Weight of a new single-stream decode step in the decode_tps moving average.
_TPS_ALPHA = 0.05


@dataclass(frozen=True)
class SampledToken:
    """A token one sequence sampled, with its log-probability when the request asked for it."""

    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(eq=False)
class _Seq:
    prompt: list[int]
    params: SamplingParams
    cancel: threading.Event
    out: queue.SimpleQueue[object] = field(default_factory=queue.SimpleQueue)
    slot: int = -1
    n_past: int = 0  # tokens of this sequence already in the KV cache
    pending: int | None = None  # last sampled token, to decode next step
    n_generated: int = 0
    sampler: SamplerChain | None = None
    abandoned: bool = False  # the consumer stopped reading

    @property
    def gone(self) -> bool:
        return self.abandoned or self.cancel.is_set()


class BatchEngine:
    """Decode up to ``n_slots`` sequences of one llama.cpp model together.

    Args:
        model: a loaded ``llama_model`` pointer (not owned: free it after :meth:`close`).
        n_ctx: tokens each sequence may hold (prompt + generated).
        n_slots: sequences decoded at once; more wait in :meth:`generate` until a slot frees.
        n_threads: compute threads to start with.
        n_batch: most tokens in one ``llama_decode`` (decode tokens first, then prompt chunks).
        n_ubatch: physical batch size (1 works around llama.cpp issue #20824 on AMX builds).
        thread_policy: called about once a second while decoding; returns the thread count to use
            (see :mod:`potluck.inference.threads`); ``None`` keeps ``n_threads``.
        token_bytes: a token id's bytes, for the text of logprobs.

    Raises:
        ModelError: llama.cpp could not create the context.
    """

    def __init__(
        self,
        model: Any,
        n_ctx: int,
        n_slots: int,
        n_threads: int,
        token_bytes: Callable[[int], bytes],
        n_batch: int = 512,
        n_ubatch: int = 512,
        thread_policy: Callable[[], int] | None = None,
    ) -> None:
        import llama_cpp as L

        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self.n_threads = n_threads
        self._token_bytes = token_bytes
        self._thread_policy = thread_policy
        self._n_batch = max(n_batch, n_slots)
        self._vocab = L.llama_model_get_vocab(model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx * n_slots
        cp.n_batch = self._n_batch
        cp.n_ubatch = min(n_ubatch, self._n_batch)
        cp.n_seq_max = n_slots
        cp.kv_unified = False  # one KV stream per sequence: attention never scans the others' cells
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        # As llama-cpp-python's Llama (flash_attn=False): the same greedy tokens as Llama.generate.
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = L.llama_init_from_model(model, cp)
        if not self._ctx:
            raise ModelError(f"llama.cpp could not create a context of {n_slots} x {n_ctx} tokens")
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(self._n_batch, 0, 1)
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._slots: list[_Seq | None] = [None] * n_slots
        self._closing = False
        self.decode_tps = 0.0  # single-stream decode tokens/s, moving average
        self.steps = 0  # llama_decode calls so far
        self.max_batch_seqs = 0  # most sequences that shared one llama_decode
        self._thread = threading.Thread(target=self._run, name="potluck-batch", daemon=True)
        self._thread.start()

    # ---- consumer side (any thread) -------------------------------------------------------

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[SampledToken]:
        """Sample up to ``params.max_tokens`` tokens after ``prompt``, decoded with the others.

        Blocks while all slots are busy. Ends at end-of-generation, ``cancel``, the budget, or when
        the caller stops iterating (the sequence then leaves the batch at the next step).

        Args:
            prompt: token ids, ``0 < len(prompt) < n_ctx``.
            params: sampling parameters with a concrete ``seed``; ``max_tokens`` within the context.

        Raises:
            RequestError: the grammar does not compile.
            GenerationError: llama.cpp failed, or the engine was closed.
        """
        if not 0 < len(prompt) < self.n_ctx or len(prompt) + params.max_tokens > self.n_ctx:
            raise GenerationError(f"{len(prompt)} prompt + {params.max_tokens} new tokens exceed {self.n_ctx}")
        seq = _Seq(list(prompt), params, cancel)
        with self._cond:
            if self._closing:
                raise GenerationError("the batch engine is closed")
            self._waiting.append(seq)
            self._cond.notify()
        try:
            while True:
                item = seq.out.get()
                if item is _END:
                    return
                if isinstance(item, Failure):
                    item.reraise()
                assert isinstance(item, SampledToken)
                yield item
        finally:
            seq.abandoned = True
            with self._cond:
                self._cond.notify()

    @property
    def busy_slots(self) -> int:
        """Sequences in the batch now."""
        return sum(s is not None for s in self._slots)

    def close(self) -> None:
        """Stop the decode thread (running sequences end with ``GenerationError``) and free the context."""
        import llama_cpp as L

        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        if self._ctx:
            L.llama_batch_free(self._batch)
            L.llama_free(self._ctx)
            self._ctx = None

    # ---- decode thread --------------------------------------------------------------------

    def _run(self) -> None:
        next_thread_check = 0.0
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not any(self._slots):
                    self._cond.wait()
                if self._closing:
                    break
            self._retire_gone()
            self._admit()
            if self._thread_policy is not None and time.monotonic() >= next_thread_check:
                next_thread_check = time.monotonic() + _THREAD_CHECK_S
                self._set_threads(self._thread_policy())
            if any(self._slots):
                try:
                    self._step()
                except Exception as exc:  # every sequence in the batch gets it; the engine keeps serving
                    log.exception("batched decode step failed")
                    err = exc if isinstance(exc, PotluckError) else GenerationError(f"llama.cpp failed: {exc}")
                    for seq in [s for s in self._slots if s is not None]:
                        self._leave(seq, Failure(err))
        closed = GenerationError("the batch engine was closed")
        for seq in [s for s in self._slots if s is not None]:
            self._leave(seq, Failure(closed))
        with self._cond:
            for seq in self._waiting:
                seq.out.put(Failure(closed))
            self._waiting.clear()

    def _set_threads(self, n: int) -> None:
        import llama_cpp as L

        if n != self.n_threads:
            log.info("decode threads %d -> %d", self.n_threads, n)
            self.n_threads = n
            L.llama_set_n_threads(self._ctx, n, n)

    def _retire_gone(self) -> None:
        for seq in self._slots:
            if seq is not None and seq.gone:
                self._leave(seq, _END)
        with self._cond:
            for seq in [s for s in self._waiting if s.gone]:
                self._waiting.remove(seq)
                seq.out.put(_END)

    def _admit(self) -> None:
        for slot, occupant in enumerate(self._slots):
            if occupant is not None:
                continue
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            try:
                seq.sampler = SamplerChain(self._vocab, seq.params)
            except PotluckError as exc:
                seq.out.put(Failure(exc))
                continue
            seq.slot = slot
            self._slots[slot] = seq

    def _leave(self, seq: _Seq, last: object) -> None:
        import llama_cpp as L

        L.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
        if seq.sampler is not None:
            seq.sampler.close()
        self._slots[seq.slot] = None
        seq.out.put(last)

    def _step(self) -> None:
        """One ``llama_decode`` over every sequence in a slot, then one sample per finished row."""
        import llama_cpp as L

        b = self._batch
        n = 0
        rows: list[tuple[_Seq, int]] = []  # (sequence, batch index whose logits it samples from)
        wrote: list[tuple[_Seq, int]] = []  # (sequence, tokens this batch adds to its KV cache)
        active = [s for s in self._slots if s is not None]
        for seq in active:  # decoding sequences: one token each
            if seq.pending is not None:
                self._put(b, n, seq.pending, seq.n_past, seq.slot, True)
                rows.append((seq, n))
                wrote.append((seq, 1))
                n += 1
        n_decode = n
        for seq in active:  # prefilling sequences: prompt chunks in the room left
            if seq.pending is None and n < self._n_batch:
                take = min(len(seq.prompt) - seq.n_past, self._n_batch - n)
                for j in range(take):
                    pos = seq.n_past + j
                    last = pos == len(seq.prompt) - 1
                    self._put(b, n, seq.prompt[pos], pos, seq.slot, last)
                    if last:
                        rows.append((seq, n))
                    n += 1
                wrote.append((seq, take))
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = L.llama_decode(self._ctx, b)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise GenerationError(f"llama_decode returned {rc} for a batch of {n} tokens")
        self.steps += 1
        self.max_batch_seqs = max(self.max_batch_seqs, len(active))
        if n == n_decode == 1 and dt > 0:  # a pure single-stream decode step: the device's speed
            rate = 1.0 / dt
            self.decode_tps = rate if self.decode_tps == 0 else (1 - _TPS_ALPHA) * self.decode_tps + _TPS_ALPHA * rate
        for seq, k in wrote:
            seq.n_past += k
        for seq, i in rows:
            self._sample(seq, i)

    @staticmethod
    def _put(b: Any, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits

    def _sample(self, seq: _Seq, index: int) -> None:
        import llama_cpp as L
        import numpy as np

        if seq.gone:
            return  # leaves at the next step
        assert seq.sampler is not None
        token = seq.sampler.sample(self._ctx, index)
        if L.llama_vocab_is_eog(self._vocab, token):
            self._leave(seq, _END)
            return
        logprob = None
        if seq.params.logprobs is not None:
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))  # (V,)
            logprob = token_logprobs(row, token, seq.params.logprobs, self._token_bytes)
        seq.out.put(SampledToken(token, logprob))
        seq.n_generated += 1
        seq.pending = token
        if seq.n_generated >= seq.params.max_tokens:
            self._leave(seq, _END)
