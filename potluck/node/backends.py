"""Pick and construct the inference backend named by ``settings.backend``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from potluck.config import Settings
from potluck.inference.backend import Backend
from potluck.inference.batched_backend import BatchedLlamaCppBackend

if TYPE_CHECKING:
    from potluck.sharding.orchestration.remote import TensorParallelService


def served_model_name(settings: Settings, path: Path) -> str:
    """The name the API serves a model under (``/v1/models`` id): ``--model-name`` or the file stem."""
    return settings.model_name or path.stem


def create_backend(settings: Settings, path: Path, tp: TensorParallelService | None = None) -> Backend:
    """An unloaded backend for the GGUF at ``path``.

    With ``--tensor-parallel N`` (N >= 2), or when the model does not fit this node's free RAM and
    the node is in a swarm (``tp``: its tensor-parallel service), the model is served
    tensor-parallel across swarm peers (:mod:`potluck.sharding.orchestration.swarm_backend`; build
    it on the node's event loop).

    Raises:
        ModelFileError: the file is not a usable GGUF.
        ConfigError: tensor parallelism asked for without the overlay.
    """
    from potluck.sharding.orchestration.placement import wants_tensor_parallel

    if wants_tensor_parallel(settings, path, tp):
        from potluck.sharding.orchestration.swarm_backend import SwarmTPBackend

        assert tp is not None  # wants_tensor_parallel refuses a node without one
        return SwarmTPBackend(settings, path, served_model_name(settings, path), tp)
    if settings.backend == "onnxruntime":
        from potluck.sharding.orchestration.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            path, served_model_name(settings, path), n_ctx=settings.n_ctx, n_threads=settings.n_threads
        )
    return BatchedLlamaCppBackend(
        path,
        served_model_name(settings, path),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
        n_slots=settings.parallel,
    )
