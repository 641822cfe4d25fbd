"""The llama.cpp backend, on llama-cpp-python (https://llama-cpp-python.readthedocs.io).

Generation uses ``Llama.generate`` (which reuses the KV cache for a shared prompt prefix) and
decodes token bytes incrementally, so multi-byte UTF-8 characters split across tokens come out
whole. Chat prompts come from the GGUF's ``tokenizer.chat_template`` (rendered with
llama-cpp-python's Jinja2 formatter) or, for models without one, a plain ``Role: text`` template.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from potluck.errors import GenerationError, ModelError, ModelFileError, RequestError
from potluck.inference.backend import ChatMessage, ChatPrompt, GeneratedToken, ModelInfo, SamplingParams
from potluck.inference.gguf_file import inspect_gguf

log = logging.getLogger(__name__)

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_plain_chat(messages: Sequence[ChatMessage]) -> ChatPrompt:
    """The fallback template: ``Role: content`` lines, ending with ``Assistant:``."""
    lines = [f"{PLAIN_ROLES[m.role]}: {m.content}" for m in messages]
    prompt = "\n".join([*lines, "Assistant:"])
    return ChatPrompt(prompt=prompt, stop=("\nUser:", "\nSystem:"))


def build_has_amx() -> bool:
    """True when the loaded llama.cpp build was compiled with its AMX kernels.

    With GCC 12 those kernels crash on quantized matmuls of more than one token (llama.cpp
    issue #20824); see ``../shared/models/README.md``.
    """
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" in info


class LlamaCppBackend:
    """A GGUF model on llama.cpp.

    Args:
        path: GGUF file.
        model_id: name the API serves it under.
        n_ctx: context length (capped by the model's training context).
        n_threads: compute threads (``None``: all cores).
        n_batch: prompt-processing batch size (tokens).
    """

    def __init__(
        self, path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512
    ) -> None:
        self._path = path
        self._summary = inspect_gguf(path)
        ctx_cap = self._summary.context_length or n_ctx
        self._n_ctx = min(n_ctx, ctx_cap)
        self._n_threads = n_threads or os.cpu_count() or 1
        self._n_batch = n_batch
        self._llm: Any = None  # llama_cpp.Llama once loaded
        self._info = ModelInfo(
            model_id=model_id,
            architecture=self._summary.architecture,
            n_layers=self._summary.n_layers,
            n_params=self._summary.n_params,
            quantization=self._summary.quantization,
            context_length=self._summary.context_length,
            n_ctx=self._n_ctx,
            path=str(path),
            size_bytes=self._summary.size_bytes,
        )
        self._formatter: Any = None  # Jinja2ChatFormatter when the GGUF has a template

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> None:
        """Load the weights into llama.cpp.

        Raises:
            ModelFileError: llama.cpp rejects the file.
            ModelError: llama-cpp-python is not installed.
        """
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise ModelError("llama-cpp-python is not installed: run scripts/install.sh") from exc
        n_batch = self._n_batch
        if build_has_amx() and self._summary.quantization not in ("F32", "F16", "BF16"):
            log.warning(
                "this llama.cpp build has AMX kernels, which crash on quantized models when built "
                "with GCC 12; evaluating one token per batch (slower prefill). Reinstall with "
                "scripts/install.sh for full speed."
            )
            n_batch = 1
        try:
            self._llm = Llama(
                model_path=str(self._path),
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                n_threads_batch=self._n_threads,
                n_batch=n_batch,
                n_ubatch=n_batch,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(f"llama.cpp could not load {self._path}: {exc}") from exc
        template = self._summary.chat_template
        if template:
            llm = self._llm
            eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="replace")
            bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="replace")
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        log.info(
            "loaded %s (%s, %s, %d layers, %.1f M params, ctx %d)",
            self._info.model_id,
            self._info.architecture,
            self._info.quantization,
            self._info.n_layers,
            self._info.n_params / 1e6,
            self._n_ctx,
        )

    def _require(self) -> Any:
        if self._llm is None:
            raise ModelError("model is not loaded")
        return self._llm

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        llm = self._require()
        bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="replace")
        if add_bos and bos and text.startswith(bos):
            add_bos = False  # the chat template already wrote it
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        if self._formatter is None:
            return render_plain_chat(messages)
        result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return ChatPrompt(prompt=result.prompt, stop=tuple(s for s in stop if s))

    def generate(
        self, prompt: str, params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GeneratedToken]:
        import llama_cpp

        llm = self._require()
        tokens = self.tokenize(prompt)
        if len(tokens) >= self._n_ctx:
            raise RequestError(f"prompt is {len(tokens)} tokens; the context holds {self._n_ctx}")
        budget = min(params.max_tokens, self._n_ctx - len(tokens))
        if params.seed is not None:
            llm.set_seed(params.seed & 0xFFFFFFFF)
        else:
            llm.set_seed(int.from_bytes(os.urandom(4), "little"))
        vocab = llm._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        n = 0
        try:
            stream = llm.generate(
                tokens,
                temp=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=0.0,
                repeat_penalty=1.0,
            )
            for token in stream:
                if cancel.is_set() or llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                n += 1
                yield GeneratedToken(token, decoder.decode(llm.detokenize([token])))
                if n >= budget:
                    break
        except (RuntimeError, ValueError) as exc:
            raise GenerationError(f"llama.cpp failed while generating: {exc}") from exc
        tail = decoder.decode(b"", final=True)
        if tail:
            yield GeneratedToken(-1, tail)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
