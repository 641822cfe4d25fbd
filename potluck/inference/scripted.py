"""A deterministic in-memory :class:`~potluck.inference.backend.Backend` with no model behind it.

What httpx's ``MockTransport`` is to its transports: the layers above the backend seam (runner,
route, router, HTTP API) can be tested without llama.cpp, fast and reproducibly. The "model" is
byte-level: token ``b`` (0-255) is the byte ``b``, :data:`BOS` and :data:`EOS` follow. Generation
emits the bytes of a reply text one token at a time (multi-byte UTF-8 characters come out whole
with the token that completes them, as with a real byte-level vocabulary).

Tests steer it through plain attributes:

* ``reply``: the text to generate, or a function of the prompt text; with ``repeat`` the text
  cycles until ``max_tokens``, otherwise it ends with EOS (finish reason ``stop``).
* :meth:`ScriptedBackend.hold` and :meth:`ScriptedBackend.release`: let a given number of tokens
  through, then hold generation (still noticing cancellation) until released, so a test keeps the
  backend busy for exactly as long as it needs, without timing.
* ``fail_after``: raise :class:`~potluck.errors.GenerationError` after that many tokens.
* ``generations``: one :class:`ScriptedGeneration` per call, to assert what the layers above asked
  for and whether it was cancelled.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from potluck.errors import GenerationError, RequestError
from potluck.inference.backend import ChatPrompt, GeneratedToken, text_tokens
from potluck.inference.chat import render_plain_chat
from potluck.routing.request import ChatMessage, SamplingParams
from potluck.routing.route import ModelInfo

BOS = 256
EOS = 257
VOCAB_SIZE = 258
DEFAULT_REPLY = "The quick brown fox jumps over the lazy dog. "
# How often a held generation looks at its cancel event (set by another thread), seconds.
_HOLD_POLL_S = 0.005


@dataclass
class ScriptedGeneration:
    """What one :meth:`ScriptedBackend.generate` call was asked and did.

    Attributes:
        prompt: the prompt text (decoded from token ids when given ids).
        params: the sampling parameters it got.
        n_tokens: tokens generated so far (EOS not counted).
        cancelled: the caller set ``cancel`` before generation ended.
        done: the generator has returned (or raised).
    """

    prompt: str
    params: SamplingParams
    n_tokens: int = 0
    cancelled: bool = False
    done: bool = False


class ScriptedBackend:
    """A byte-level scripted model (implements :class:`~potluck.inference.backend.Backend`).

    Args:
        model_id: the id the model is served under.
        reply: the text every generation produces, or ``f(prompt_text) -> text``.
        repeat: cycle ``reply`` until ``max_tokens`` (finish ``length``) instead of ending with EOS.
        n_ctx: context length in tokens (bytes + BOS); longer prompts are a ``RequestError``.
        fail_after: raise ``GenerationError`` after this many tokens (``None``: never).
    """

    def __init__(
        self,
        model_id: str = "scripted",
        reply: str | Callable[[str], str] = DEFAULT_REPLY,
        *,
        repeat: bool = True,
        n_ctx: int = 512,
        fail_after: int | None = None,
    ) -> None:
        self.reply = reply
        self.repeat = repeat
        self.fail_after = fail_after
        self._budget = threading.Condition()
        self._allowance: int | None = None  # tokens let through before holding; None: no limit
        self._holding = 0
        self.loaded = False
        self.closed = False
        self.generations: list[ScriptedGeneration] = []
        self._info = ModelInfo(
            model_id=model_id,
            architecture="scripted",
            n_layers=1,
            n_params=0,
            quantization="none",
            context_length=n_ctx,
            n_ctx=n_ctx,
            path=f"scripted://{model_id}",
            size_bytes=0,
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> None:
        self.loaded = True

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return [BOS, *text.encode()] if add_bos else list(text.encode())

    def render_chat(self, messages: Sequence[ChatMessage], tools: str | None = None) -> ChatPrompt:
        return render_plain_chat(messages, tools)

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GeneratedToken]:
        """Emit ``reply`` byte by byte, up to ``params.max_tokens`` tokens.

        Raises:
            RequestError: the prompt does not fit ``n_ctx``.
            GenerationError: ``fail_after`` tokens were generated.
        """
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) >= self._info.n_ctx:
            raise RequestError(f"prompt is {len(ids)} tokens but the context holds {self._info.n_ctx}")
        text = bytes(i for i in ids if i < 256).decode(errors="replace")
        record = ScriptedGeneration(text, params)
        self.generations.append(record)
        reply = self.reply(text) if callable(self.reply) else self.reply
        try:
            yield from text_tokens(self._token_ids(reply.encode(), params.max_tokens, cancel, record), _byte)
        finally:
            record.done = True

    def hold(self, after: int = 0) -> None:
        """Let ``after`` more tokens through (over all generations), then hold until :meth:`release`."""
        with self._budget:
            self._allowance = after

    def release(self) -> None:
        """Stop holding: generations run freely again."""
        with self._budget:
            self._allowance = None
            self._budget.notify_all()

    @property
    def held(self) -> bool:
        """A generation is waiting for :meth:`release`."""
        with self._budget:
            return self._holding > 0

    def _take_token(self, cancel: threading.Event) -> bool:
        """Wait until a token may be generated (True) or ``cancel`` is set (False)."""
        with self._budget:
            while self._allowance == 0:
                if cancel.is_set():
                    return False
                self._holding += 1
                try:
                    self._budget.wait(_HOLD_POLL_S)
                finally:
                    self._holding -= 1
            if self._allowance is not None:
                self._allowance -= 1
        return not cancel.is_set()

    def _token_ids(
        self, data: bytes, max_tokens: int, cancel: threading.Event, record: ScriptedGeneration
    ) -> Iterator[int]:
        """The reply's token ids, one at a time, honouring ``max_tokens``, holds and ``cancel``."""
        while record.n_tokens < max_tokens:
            if not self._take_token(cancel):
                record.cancelled = True
                return
            if self.fail_after is not None and record.n_tokens >= self.fail_after:
                raise GenerationError(f"scripted failure after {record.n_tokens} tokens")
            i = record.n_tokens
            if not data or (i >= len(data) and not self.repeat):
                return  # EOS
            record.n_tokens += 1
            yield data[i % len(data)]

    def close(self) -> None:
        self.closed = True


def _byte(token: int) -> bytes:
    return bytes([token]) if token < 256 else b""
