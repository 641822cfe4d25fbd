"""The ONNX Runtime backend: the tensor-parallel engine with one rank, behind the Backend protocol.

``potluck node start --backend onnxruntime --model X.gguf`` serves through it. Weights come straight
from the GGUF (Q4_0/Q8_0 repacked for ``MatMulNBits``, no shard file); tokenization and chat
templates are llama.cpp's (vocab-only load), so prompts tokenize exactly as on the llama.cpp backend.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from potluck.errors import ModelError, RequestError
from potluck.inference.backend import ChatMessage, ChatPrompt, GeneratedToken, ModelInfo, SamplingParams
from potluck.inference.gguf_file import inspect_gguf
from potluck.sharding.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.extract import extract_shard
from potluck.sharding.gguf_tensors import open_gguf, read_config
from potluck.sharding.group import SoloGroup, generate_ids, plan_for
from potluck.sharding.plan import NodeCapability
from potluck.sharding.tokenizer import GGUFTokenizer

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """A llama-family GGUF on ONNX Runtime (single node).

    Args:
        path: GGUF file.
        model_id: name the API serves it under.
        n_ctx: context length (capped by the model's training context).
        n_threads: ORT intra-op threads (``None``: all cores).

    Raises:
        ModelFileError: the file is not a GGUF of a supported architecture.
    """

    def __init__(self, path: Path, model_id: str, n_ctx: int = 2048, n_threads: int | None = None) -> None:
        self._path = Path(path)
        summary = inspect_gguf(self._path)
        self._config = read_config(open_gguf(self._path))
        self._n_ctx = min(n_ctx, summary.context_length or n_ctx)
        self._threads = n_threads or os.cpu_count() or 1
        self._info = ModelInfo(
            model_id=model_id,
            architecture=summary.architecture,
            n_layers=summary.n_layers,
            n_params=summary.n_params,
            quantization=summary.quantization,
            context_length=summary.context_length,
            n_ctx=self._n_ctx,
            path=str(path),
            size_bytes=summary.size_bytes,
            extra={"backend": "onnxruntime"},
        )
        self._template = summary.chat_template
        self._group: SoloGroup | None = None
        self._tok: GGUFTokenizer | None = None
        self._formatter: Any = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def load(self) -> None:
        """Repack the weights and compile the ORT sessions.

        Raises:
            ModelFileError: unusable file. ModelError: llama-cpp-python (tokenizer) missing.
        """
        reader = open_gguf(self._path)
        plan = plan_for(reader, self._path, [NodeCapability("local", 1 << 62, 1.0)], self._n_ctx)
        shard = extract_shard(reader, plan, 0)
        options = EngineOptions(n_ctx=self._n_ctx, threads=self._threads)
        self._group = SoloGroup(TPMaster(RankCompute.from_shard(shard, options), shard, None))
        self._tok = GGUFTokenizer(self._path)
        if self._template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=self._template, eos_token=self._tok.eos_text, bos_token=self._tok.bos_text
            )
        log.info("loaded %s on ONNX Runtime (%d threads, ctx %d)", self._info.model_id, self._threads, self._n_ctx)

    def _require(self) -> tuple[SoloGroup, GGUFTokenizer]:
        if self._group is None or self._tok is None:
            raise ModelError("model is not loaded")
        return self._group, self._tok

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._require()[1].tokenize(text, add_bos)

    def render_chat(self, messages: Sequence[ChatMessage]) -> ChatPrompt:
        from potluck.inference.llamacpp import render_plain_chat

        if self._formatter is None:
            return render_plain_chat(messages)
        result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return ChatPrompt(prompt=result.prompt, stop=tuple(s for s in stop if s))

    def generate(self, prompt: str, params: SamplingParams, cancel: threading.Event) -> Iterator[GeneratedToken]:
        group, tok = self._require()
        ids = tok.tokenize(prompt)
        if len(ids) >= self._n_ctx:
            raise RequestError(f"prompt is {len(ids)} tokens; the context holds {self._n_ctx}")
        budget = min(params.max_tokens, self._n_ctx - len(ids))
        if params.seed is None:
            params = SamplingParams(
                budget,
                params.temperature,
                params.top_p,
                params.top_k,
                int.from_bytes(os.urandom(4), "little"),
                params.stop,
            )
        else:
            params = SamplingParams(budget, params.temperature, params.top_p, params.top_k, params.seed, params.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in generate_ids(group, ids, params, tok.eog_ids, cancel):
            yield GeneratedToken(token, decoder.decode(tok.token_bytes(token)))
        tail = decoder.decode(b"", final=True)
        if tail:
            yield GeneratedToken(-1, tail)

    def close(self) -> None:
        if self._tok is not None:
            self._tok.close()
        self._group = self._tok = None
