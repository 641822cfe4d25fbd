"""The node's backend when it serves a model tensor-parallel across swarm peers.

:class:`SwarmTPBackend` implements :class:`~potluck.inference.backend.Backend` around a
:class:`~potluck.sharding.swarm.SwarmGroup`, so :class:`~potluck.inference.runner.ModelRunner` and
``LocalRoute`` serve it through the normal OpenAI API unchanged. Tokenization and chat templates
are llama.cpp's (vocab-only load), as on the other backends, so prompts tokenize identically.

:func:`potluck.sharding.placement.wants_tensor_parallel` decides whether a node starts this
backend: ``--tensor-parallel N`` with N >= 2, or (N = 0, the default) when the planner's memory
check says the model does not fit this node's free RAM alone (:mod:`potluck.sharding.placement`).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from potluck.config import Settings
from potluck.errors import ModelError, RequestError
from potluck.inference.backend import ChatMessage, ChatPrompt, GeneratedToken, ModelInfo, SamplingParams
from potluck.inference.gguf_file import inspect_gguf
from potluck.sharding.group import generate_ids
from potluck.sharding.remote import default_threads
from potluck.sharding.swarm import SwarmContext, SwarmGroup
from potluck.sharding.tokenizer import GGUFTokenizer

log = logging.getLogger(__name__)


class SwarmTPBackend:
    """A llama-family GGUF served by a tensor-parallel group of swarm peers.

    Args:
        settings: the node's settings (tensor-parallel section, threads, context).
        path: GGUF file (only this node, the master, needs it).
        model_id: name the API serves it under.
        overlay: the node's ``OverlayService``; its ``tp`` service must be running by :meth:`load`.

    Must be constructed on the node's event loop (it remembers the loop for overlay calls).
    """

    def __init__(self, settings: Settings, path: Path, model_id: str, overlay: Any) -> None:
        self._settings = settings
        self._path = Path(path)
        self._overlay = overlay
        self._loop = asyncio.get_running_loop()
        summary = inspect_gguf(self._path)
        self._n_ctx = min(settings.n_ctx, summary.context_length or settings.n_ctx)
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
            extra={"backend": "tensor-parallel"},
        )
        self._template = summary.chat_template
        self._group: SwarmGroup | None = None
        self._tok: GGUFTokenizer | None = None
        self._formatter: Any = None
        self._stop = threading.Event()  # ends a load still waiting for workers

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def group(self) -> SwarmGroup | None:
        return self._group

    def load(self) -> None:
        """Find workers, plan, hand out shards, form the group (blocks; run off the event loop).

        Raises:
            ModelError: the overlay's tensor-parallel service is not running.
            ShardPlanError / GenerationError: no group could be formed.
        """
        s = self._settings
        tp = self._overlay.tp
        if tp is None:
            raise ModelError("the tensor-parallel service is not running")
        ctx = SwarmContext(
            overlay=self._overlay,
            loop=self._loop,
            registry=tp.pending,
            bind_host=s.p2p_host,
            shard_dir=Path(s.cache_dir) / "tp-shards",
            transport=s.tp_transport,
            timeout_s=s.tp_timeout_s,
            join_timeout_s=s.tp_join_timeout_s,
            threads=default_threads(s.n_threads),
            stop=self._stop,
        )
        self._tok = GGUFTokenizer(self._path)
        if self._template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=self._template, eos_token=self._tok.eos_text, bos_token=self._tok.bos_text
            )
        self._group = SwarmGroup(ctx, self._path, self._n_ctx, s.tensor_parallel)
        self._info.extra["world_size"] = str(self._group.world_size)

    def _require(self) -> tuple[SwarmGroup, GGUFTokenizer]:
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
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        budget = min(params.max_tokens, self._n_ctx - len(ids))
        params = SamplingParams(budget, params.temperature, params.top_p, params.top_k, seed, params.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in generate_ids(group, ids, params, tok.eog_ids, cancel):
            yield GeneratedToken(token, decoder.decode(tok.token_bytes(token)))
        self._info.extra["world_size"] = str(group.world_size)
        tail = decoder.decode(b"", final=True)
        if tail:
            yield GeneratedToken(-1, tail)

    def close(self) -> None:
        self._stop.set()
        if self._group is not None:
            self._group.close()
        if self._tok is not None:
            self._tok.close()
        self._group = self._tok = None
