"""Whether a node serves its model alone or tensor-parallel across the swarm (cheap to import).

``--tensor-parallel N`` with N >= 2 always forms a group; N = 1 never does; N = 0 (the default)
forms one only when the planner's memory check says the model does not fit this node's free RAM
(:func:`fits_locally`), and only for a node in a swarm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil

from potluck.config import Settings
from potluck.errors import ConfigError, PotluckError, ShardPlanError

log = logging.getLogger(__name__)


def fits_locally(path: Path, n_ctx: int, free_ram: int | None = None) -> bool:
    """Whether this node alone can hold the model: the planner's memory check with one node
    (weights, KV cache at ``n_ctx``, embeddings and head within ``free_ram`` bytes, default: the
    RAM available now)."""
    from potluck.sharding.format.gguf_tensors import open_gguf
    from potluck.sharding.format.plan import MEMORY_HEADROOM, NodeCapability
    from potluck.sharding.orchestration.group import plan_for

    ram = int(psutil.virtual_memory().available) if free_ram is None else free_ram
    if path.stat().st_size * 2 < ram * MEMORY_HEADROOM:
        return True  # far from the limit: skip reading the geometry
    try:
        plan_for(open_gguf(path), path, [NodeCapability("self", ram, 1.0)], n_ctx)
    except ShardPlanError:
        return False
    return True


def wants_tensor_parallel(settings: Settings, path: Path, swarm: object | None) -> bool:
    """Whether to serve ``path`` tensor-parallel across the swarm.

    Args:
        settings: the node's settings (``tensor_parallel``, ``n_ctx``).
        path: the GGUF.
        swarm: what would find worker peers (any object), or ``None`` for a node without the overlay.

    Raises:
        ConfigError: ``--tensor-parallel`` asked for without the overlay (``p2p_enabled`` off).
    """
    if settings.tensor_parallel == 1:
        return False
    if settings.tensor_parallel >= 2:
        if swarm is None:
            raise ConfigError("--tensor-parallel needs the overlay (p2p_enabled) to find worker peers")
        return True
    if swarm is None:
        return False
    try:
        if fits_locally(Path(path), settings.n_ctx):
            return False
    except (PotluckError, OSError) as exc:  # not a model the TP engine can split: serve it alone
        log.debug("no tensor-parallel check for %s: %s", path, exc)
        return False
    log.info("%s does not fit this node's free RAM: serving it tensor-parallel across the swarm", Path(path).name)
    return True
