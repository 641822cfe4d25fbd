"""The node's backend when it serves a model tensor-parallel across swarm peers.

:class:`SwarmTPBackend` implements :class:`~potluck.inference.backend.Backend` around a
:class:`~potluck.sharding.orchestration.swarm.SwarmGroup`, so :class:`~potluck.inference.runner.ModelRunner` and
``LoadedModelRoute`` serve it through the normal OpenAI API unchanged. Tokenization and chat templates
are llama.cpp's (vocab-only load), as on the other backends, so prompts tokenize identically.

:func:`potluck.sharding.orchestration.placement.wants_tensor_parallel` decides whether a node starts this
backend: ``--tensor-parallel N`` with N >= 2, or (N = 0, the default) when the planner's memory
check says the model does not fit this node's free RAM alone (:mod:`potluck.sharding.orchestration.placement`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from potluck.config import Settings
from potluck.errors import ModelError
from potluck.sharding.orchestration.context import SwarmContext
from potluck.sharding.orchestration.ort_backend import TPBackendBase
from potluck.sharding.orchestration.remote import TensorParallelService, default_threads
from potluck.sharding.orchestration.swarm import SwarmGroup

log = logging.getLogger(__name__)


class SwarmTPBackend(TPBackendBase):
    """A llama-family GGUF served by a tensor-parallel group of swarm peers.

    Args:
        settings: the node's settings (tensor-parallel section, threads, context).
        path: GGUF file (only this node, the master, needs it).
        model_id: name the API serves it under.
        tp: the node's tensor-parallel service (its swarm port and the registry of forming groups);
            it must be running by :meth:`load`.

    Must be constructed on the node's event loop (it remembers the loop for swarm calls).
    """

    def __init__(self, settings: Settings, path: Path, model_id: str, tp: TensorParallelService) -> None:
        super().__init__(path, model_id, settings.n_ctx, "tensor-parallel")
        self._settings = settings
        self._tp = tp
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()  # ends a load still waiting for workers

    @property
    def group(self) -> SwarmGroup | None:
        return self._group

    def load(self) -> None:
        """Find workers, plan, hand out shards, form the group (blocks; run off the event loop).

        Raises:
            ModelError: the node's tensor-parallel service is not running.
            ShardPlanError / GenerationError / ProtocolViolation: no group could be formed.
        """
        s = self._settings
        tp = self._tp
        if not tp.running:
            raise ModelError("the tensor-parallel service is not running")
        ctx = SwarmContext(
            overlay=tp.swarm,
            loop=self._loop,
            registry=tp.pending,
            bind_host=s.p2p_host,
            shard_dir=Path(s.cache_dir) / "tp-shards",
            transport=s.tp_transport,
            timeout_s=s.tp_timeout_s,
            join_timeout_s=s.tp_join_timeout_s,
            threads=default_threads(s.n_threads),
            memory_budget=s.effective_memory_budget(),
            spill_dir=Path(s.cache_dir) / "tp-spill",
            stop=self._stop,
        )
        self._load_tokenizer()
        self._group = SwarmGroup(ctx, self._path, self._n_ctx, s.tensor_parallel)
        self._info.extra["world_size"] = str(self._group.world_size)

    def _generated(self, group: SwarmGroup) -> None:
        self._info.extra["world_size"] = str(group.world_size)  # after a re-plan it may have shrunk

    def close(self) -> None:
        self._stop.set()
        if self._group is not None:
            self._group.close()
        self._close_tokenizer()
