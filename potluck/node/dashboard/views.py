"""The dashboard's sections: JSON-ready views of the node, read from where the facts already live.

Each public class or function here is a source for :class:`~potluck.node.events.EventHub`
(called on the event loop once per poll; none blocks for long):

========== ==================================================================================
section    source
========== ==================================================================================
node       :func:`node_view`: identity, load, RAM and cores, privacy level, swarm settings
cluster    the overlay's ``cluster_view()`` (``GET /api/cluster``) plus admission refusals
models     :func:`models_view`: local models, the swarm's models and where each runs, cache
tp         :class:`TensorParallelView`: plan shares, memory and live ms/token per group
audit      :class:`AuditView`: the privacy audit log (counts only) and totals per destination
throughput :class:`Throughput`: samples of the node's own counters over the last minutes
log        :class:`ActivityLog`: peers joining and leaving, re-plans, model pulls
========== ==================================================================================
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from potluck import __version__
from potluck.config import Settings
from potluck.node.events import now_ms
from potluck.node.metrics import NodeMetrics
from potluck.privacy.audit import AuditLog
from potluck.routing.router import Router

AUDIT_ROWS = 100  # most recent audit records sent to the page
THROUGHPUT_WINDOW_S = 300.0  # the throughput chart's span
THROUGHPUT_STEP_S = 2.0  # seconds between samples
LOG_SIZE = 50  # activity entries kept


def node_view(settings: Settings, router: Router, peer_id: str, started_at: float, overlay: Any) -> dict[str, Any]:
    """This node: who it is, what it serves, how loaded it is, and its swarm and privacy settings."""
    routes = router.local_routes
    vm = psutil.virtual_memory()
    decode_tps = overlay.local.decode_tps if overlay is not None else 0.0
    return {
        "peer_id": peer_id,
        "version": __version__,
        "uptime_s": int(time.monotonic() - started_at),
        "models": [r.model_id for r in routes],
        "queue_depth": sum(r.queue_depth for r in routes),
        "active_requests": sum(r.active for r in routes),
        "ram_total": int(vm.total),
        "ram_used": int(vm.total - vm.available),
        "cores": os.cpu_count() or 1,
        "decode_tps": round(decode_tps, 1),
        "privacy": settings.privacy,
        "p2p": overlay is not None,
        "swarm": settings.swarm,
        "private_swarm": bool(settings.swarm_secret),
        "allowlist_only": settings.allowlist_only,
    }


def cluster_view(overlay: Any) -> dict[str, Any] | None:
    """The overlay's signed-state view with this node's admission refusals by reason (``None``: no overlay)."""
    if overlay is None or not overlay.started:
        return None
    view: dict[str, Any] = overlay.cluster_view()
    refused: dict[str, int] = {}
    for metric in overlay.metrics.admission_refused.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.value:
                refused[s.labels.get("reason", "?")] = int(s.value)
    view["refused"] = refused
    return view


def models_view(router: Router, cluster: dict[str, Any] | None, cache_dir: Path) -> dict[str, Any]:
    """Local models (with their GGUF facts), every model reachable, where each runs, and the cache."""
    local = [asdict(r.info) for r in router.local_routes]
    runs_on: dict[str, list[str]] = {}
    for peer in (cluster or {}).get("peers", []):
        for m in peer.get("models", []):
            runs_on.setdefault(m["id"], []).append(peer["peer_id"])
    reachable = [{"id": m.id, "owned_by": m.owned_by, "runs_on": runs_on.get(m.id, [])} for m in router.listings()]
    from potluck.inference.resolve import cached_models

    cached = [{"name": p.name, "size": p.stat().st_size} for p in cached_models(cache_dir)]
    return {"local": local, "reachable": reachable, "cached": cached}


class ActivityLog:
    """Recent notable events, newest last (bounded)."""

    def __init__(self, size: int = LOG_SIZE) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, kind: str, text: str) -> dict[str, Any]:
        entry = {"time_ms": now_ms(), "kind": kind, "text": text}
        self.entries.append(entry)
        return entry

    def view(self) -> list[dict[str, Any]]:
        return list(self.entries)


class PeerWatch:
    """Turns changes of the cluster's peer set into activity entries (joined / left)."""

    def __init__(self, activity: ActivityLog) -> None:
        self.activity = activity
        self._known: set[str] | None = None

    def update(self, cluster: dict[str, Any] | None) -> None:
        peers = {p["peer_id"] for p in (cluster or {}).get("peers", []) if not p.get("self")}
        if self._known is not None:
            for p in sorted(peers - self._known):
                self.activity.add("peer", f"peer {p} joined")
            for p in sorted(self._known - peers):
                self.activity.add("peer", f"peer {p} left (its record expired)")
        self._known = peers


class TensorParallelView:
    """Tensor-parallel groups this node leads: plan shares, memory, live ms/token; re-plans as activity.

    Per-rank figures for the workers would need a collective call (``gather_stats``) that competes
    with generation, so the live ms/token shown is the master's own (rank 0): its compute time and
    the time it waits in all-reduce, per decode step. Reads the groups by duck typing (``group``,
    ``plan``, ``workers``, ``master.compute.stats``) so the sharding package stays free to change.
    """

    def __init__(self, router: Router, activity: ActivityLog) -> None:
        self.router = router
        self.activity = activity
        self._plans: dict[str, str] = {}

    def __call__(self) -> list[dict[str, Any]]:
        groups = []
        for route in self.router.local_routes:
            backend = getattr(getattr(route, "runner", None), "backend", None)
            group = getattr(backend, "group", None)
            plan = getattr(group, "plan", None)
            if group is None or plan is None:
                continue
            groups.append(self._group(route.model_id, group, plan))
        return groups

    def _group(self, model: str, group: Any, plan: Any) -> dict[str, Any]:
        plan_id = str(plan.plan_id)
        before = self._plans.get(model)
        if before is not None and before != plan_id:
            self.activity.add("tp", f"{model}: re-planned over {plan.world_size} ranks (plan {plan_id[:8]})")
        self._plans[model] = plan_id
        budgets = {w.peer_id: w.ram_free for w in getattr(group, "workers", [])}
        transports = getattr(group, "transport_used", {})
        shares = [
            {
                "rank": s.rank,
                "peer_id": s.node_id,
                "heads": [s.kv_start * plan.group, (s.kv_start + s.kv_count) * plan.group],
                "kv_groups": [s.kv_start, s.kv_start + s.kv_count],
                "ffn": [s.ffn_start, s.ffn_start + s.ffn_count],
                "est_bytes": s.est_bytes,
                "budget_bytes": budgets.get(s.node_id),
                "transport": transports.get(s.rank, "local" if s.rank == 0 else None),
            }
            for s in plan.shares
        ]
        stats = getattr(getattr(getattr(group, "master", None), "compute", None), "stats", None)
        live = None
        if stats is not None and stats.steps:
            live = {
                "compute_ms": round(1000 * stats.compute_s / stats.steps, 2),
                "allreduce_ms": round(1000 * stats.comm_s / stats.steps, 2),
                "steps": stats.steps,
            }
        return {
            "model": model,
            "plan_id": plan_id,
            "world_size": plan.world_size,
            "n_heads": plan.n_heads,
            "ffn": plan.ffn,
            "n_layers": plan.n_layers,
            "shares": shares,
            "master_live": live,
        }


class AuditView:
    """The privacy audit (``privacy-audit.jsonl``): recent rows and totals per destination.

    The file is re-read only when its size or modification time changed.
    """

    def __init__(self, audit: AuditLog, rows: int = AUDIT_ROWS) -> None:
        self.audit = audit
        self.rows = rows
        self._stamp: tuple[int, int] | None = None
        self._view: dict[str, Any] = {"rows": [], "totals": [], "count": 0}

    def __call__(self) -> dict[str, Any]:
        try:
            st = self.audit.path.stat()
        except FileNotFoundError:
            return self._view
        stamp = (st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._stamp = stamp
            self._view = self._read()
        return self._view

    def _read(self) -> dict[str, Any]:
        recent: deque[dict[str, Any]] = deque(maxlen=self.rows)
        totals: dict[str, dict[str, Any]] = {}
        count = 0
        for rec in self.audit.records():
            count += 1
            recent.append(
                {
                    "time": rec.time,
                    "destination": rec.destination,
                    "tier": rec.tier,
                    "action": rec.action,
                    "level": rec.level,
                    "entities": rec.entities,
                    "chars": rec.chars,
                }
            )
            t = totals.setdefault(
                rec.destination,
                {"destination": rec.destination, "tier": rec.tier, "requests": 0, "chars": 0, "entities": {}},
            )
            t["requests"] += 1
            t["chars"] += rec.chars
            for kind, n in rec.entities.items():
                t["entities"][kind] = t["entities"].get(kind, 0) + n
        return {
            "rows": list(reversed(recent)),
            "totals": sorted(totals.values(), key=lambda t: t["destination"]),
            "count": count,
        }


class Throughput:
    """Samples of the node's own counters (tokens, completion requests, 429s, 5xx) every few seconds."""

    def __init__(self, metrics: NodeMetrics, window_s: float = THROUGHPUT_WINDOW_S, step_s: float = THROUGHPUT_STEP_S):
        self.metrics = metrics
        self.step_s = step_s
        self._samples: deque[list[float]] = deque(maxlen=int(window_s / step_s) + 1)
        self._last = 0.0

    def __call__(self) -> dict[str, Any]:
        now = time.time()
        if now - self._last >= self.step_s:
            self._last = now
            t = self.metrics.totals()
            self._samples.append([round(now, 2), t["tokens"], t["requests"], t["rate_limited"], t["errors"]])
        return {"fields": ["time", "tokens", "requests", "rate_limited", "errors"], "samples": list(self._samples)}
