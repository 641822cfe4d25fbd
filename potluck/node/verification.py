"""Wiring of serving-quality verification (issue 14) into the node.

The overlay's :class:`~potluck.overlay.verification.verifier.Verifier` knows neither llama.cpp nor
the runner; here the node hands it each loaded model's content address (hashed in a worker
thread, cached in the data dir) and the model's own route, through which challenges run like any
request (greedy, ``logprobs=2``), and the overlay advertises the hash from then on.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from potluck.config import Settings
from potluck.inference.llamacpp import LlamaCppBackend
from potluck.inference.route import LoadedModelRoute
from potluck.inference.runner import ModelRunner
from potluck.overlay.service import OverlayService
from potluck.overlay.verification.challenge import RouteChallengeModel
from potluck.overlay.verification.fileid import file_identity
from potluck.overlay.verification.verifier import Verifier

log = logging.getLogger(__name__)


def attach_verifier(settings: Settings, overlay: OverlayService) -> Verifier:
    """Create the verifier and register it with the overlay (RPC answers, record, cluster view);
    its check loop is started by :func:`start_checks` once the overlay runs."""
    verifier = Verifier(overlay.identity, overlay, settings.verify_interval_s)
    overlay.verification = verifier
    overlay.local.content_id = verifier.content_id
    return verifier


def start_checks(overlay: OverlayService, verifier: Verifier) -> None:
    """Start the check loop as a task the overlay owns (cancelled before the overlay stops)."""
    overlay.start_task(verifier.run(), "verifier")


async def register_model(settings: Settings, verifier: Verifier, runner: ModelRunner) -> bool:
    """Hash the runner's model file and let the verifier advertise and defend it.

    Returns:
        False when the model cannot be verified (not on llama.cpp, e.g. tensor-parallel, whose
        numbers are not held to llama.cpp's tolerance; or the file is unreadable): it is then
        advertised by name only and never challenged.
    """
    backend = runner.backend
    if not isinstance(backend, LlamaCppBackend):
        return False
    path = Path(backend.info.path)
    try:
        ident = await asyncio.to_thread(file_identity, settings.data_dir, path)
    except OSError as exc:
        log.warning("cannot hash %s for verification: %s", path, exc)
        return False
    verifier.add_model(backend.info.model_id, ident, RouteChallengeModel(LoadedModelRoute(runner)))
    return True
