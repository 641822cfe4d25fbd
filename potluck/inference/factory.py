"""Pick and construct the inference backend named by ``settings.backend``."""

from __future__ import annotations

from pathlib import Path

from potluck.config import Settings
from potluck.inference.backend import Backend
from potluck.inference.llamacpp import LlamaCppBackend


def model_id_for(settings: Settings, path: Path) -> str:
    """The id the API serves a model under: ``--model-name`` or the file stem."""
    return settings.model_name or path.stem


def create_backend(settings: Settings, path: Path) -> Backend:
    """An unloaded backend for the GGUF at ``path``.

    Raises:
        ModelFileError: the file is not a usable GGUF.
    """
    if settings.backend == "onnxruntime":
        from potluck.sharding.backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            path, model_id_for(settings, path), n_ctx=settings.n_ctx, n_threads=settings.n_threads
        )
    return LlamaCppBackend(
        path,
        model_id_for(settings, path),
        n_ctx=settings.n_ctx,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
    )
