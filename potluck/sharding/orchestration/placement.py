"""Whether a node serves its model alone or tensor-parallel across the swarm (cheap to import).

``--tensor-parallel N`` with N >= 2 always forms a group; N = 1 never does; N = 0 (the default)
forms one only when the model does not fit this node's memory budget (``--memory-budget``; without
one, its free RAM; :func:`fits_locally`), and only for a node in a swarm. The group's size is then
the cost model's choice (:mod:`potluck.sharding.orchestration.selection`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil

from potluck.config import Settings
from potluck.errors import ConfigError, PotluckError, ShardPlanError

log = logging.getLogger(__name__)


def fits_locally(path: Path, n_ctx: int, free_ram: int | None = None, budget: int = 0) -> bool:
    """Whether this node alone can hold the model: its planned bytes (weights, KV cache at
    ``n_ctx``, embeddings and head) within ``budget`` bytes when one is given, else the planner's
    memory check against ``free_ram`` bytes (default: the RAM available now)."""
    from potluck.sharding.format.gguf_tensors import open_gguf
    from potluck.sharding.format.plan import DISK_BACKED, MEMORY_HEADROOM, NodeCapability
    from potluck.sharding.orchestration.group import plan_for

    ram = int(psutil.virtual_memory().available) if free_ram is None else free_ram
    limit = budget or ram * MEMORY_HEADROOM
    if path.stat().st_size * 2 < limit:
        return True  # far from the limit: skip reading the geometry
    try:
        plan = plan_for(open_gguf(path), path, [NodeCapability("self", DISK_BACKED, 1.0)], n_ctx)
    except ShardPlanError:
        return False
    return plan.shares[0].est_bytes <= limit


def wants_tensor_parallel(settings: Settings, path: Path, swarm: object | None) -> bool:
    """Whether to serve ``path`` tensor-parallel across the swarm.

    Args:
        settings: the node's settings (``tensor_parallel``, ``n_ctx``, ``memory_budget``).
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
        if fits_locally(Path(path), settings.n_ctx, budget=int(settings.memory_budget)):
            return False
    except (PotluckError, OSError) as exc:  # not a model the TP engine can split: serve it alone
        log.debug("no tensor-parallel check for %s: %s", path, exc)
        return False
    limit = "memory budget" if settings.memory_budget else "free RAM"
    log.info("%s does not fit this node's %s: serving it tensor-parallel across the swarm", Path(path).name, limit)
    return True
