"""The ONNX Runtime backend: the tensor-parallel engine with one rank, behind the Backend protocol.

``potluck node start --backend onnxruntime --model X.gguf`` serves through it. Weights come straight
from the GGUF (Q4_0/Q8_0 repacked for ``MatMulNBits``, no shard file); tokenization and chat
templates are llama.cpp's (vocab-only load), so prompts tokenize exactly as on the llama.cpp backend.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from potluck.errors import ModelError, RequestError
from potluck.inference.backend import ChatPrompt, GeneratedToken, model_info, seeded, text_tokens
from potluck.inference.chat import ChatTemplate
from potluck.inference.gguf_file import GGUFSummary, inspect_gguf
from potluck.routing.request import ChatMessage, SamplingParams
from potluck.routing.route import ModelInfo
from potluck.sharding.compute.engine import EngineOptions, RankCompute, TPMaster
from potluck.sharding.format.extract import extract_shard
from potluck.sharding.format.gguf_tensors import open_gguf, read_config
from potluck.sharding.format.plan import NodeCapability
from potluck.sharding.format.tokenizer import GGUFTokenizer
from potluck.sharding.orchestration.group import SoloGroup, generate_ids, plan_for

log = logging.getLogger(__name__)


class TPBackendBase:
    """What the tensor-parallel backends share: GGUF info, llama.cpp's tokenizer (vocab-only load)
    and chat template, and the generation loop over a group
    (:func:`~potluck.sharding.orchestration.group.generate_ids`).

    Subclasses set ``self._group`` in ``load`` and call :meth:`_load_tokenizer`.
    """

    def __init__(self, path: Path, model_id: str, n_ctx: int, backend_name: str) -> None:
        self._path = Path(path)
        self._summary: GGUFSummary = inspect_gguf(self._path)
        self._n_ctx = min(n_ctx, self._summary.context_length or n_ctx)
        self._info = model_info(self._summary, model_id, self._n_ctx, str(path), backend=backend_name)
        self._group: Any = None
        self._tok: GGUFTokenizer | None = None
        self._chat = ChatTemplate(None)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def _load_tokenizer(self) -> None:
        self._tok = GGUFTokenizer(self._path)
        self._chat = ChatTemplate(self._summary.chat_template, self._tok.bos_text, self._tok.eos_text)

    def _require(self) -> tuple[Any, GGUFTokenizer]:
        if self._group is None or self._tok is None:
            raise ModelError("model is not loaded")
        return self._group, self._tok

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return self._require()[1].tokenize(text, add_bos)

    def render_chat(self, messages: Sequence[ChatMessage], tools: str | None = None) -> ChatPrompt:
        return self._chat.render(messages, tools)

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, cancel: threading.Event
    ) -> Iterator[GeneratedToken]:
        group, tok = self._require()
        ids = tok.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) >= self._n_ctx:
            raise RequestError(f"prompt is {len(ids)} tokens; the context holds {self._n_ctx}")
        params = seeded(params, min(params.max_tokens, self._n_ctx - len(ids)))
        yield from text_tokens(generate_ids(group, ids, params, tok.eog_ids, cancel), tok.token_bytes)
        self._generated(group)

    def _generated(self, group: Any) -> None:
        """Hook run after each completed generation."""

    def _close_tokenizer(self) -> None:
        if self._tok is not None:
            self._tok.close()
        self._group = self._tok = None


class OnnxRuntimeBackend(TPBackendBase):
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
        super().__init__(path, model_id, n_ctx, "onnxruntime")
        self._config = read_config(open_gguf(self._path))
        self._threads = n_threads or os.cpu_count() or 1

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
        self._load_tokenizer()
        log.info("loaded %s on ONNX Runtime (%d threads, ctx %d)", self._info.model_id, self._threads, self._n_ctx)

    def close(self) -> None:
        self._close_tokenizer()
