"""Prometheus metrics of the overlay, registered in the node's registry (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class OverlayMetrics:
    """Counters of what the overlay accepted, rejected and refused.

    Args:
        registry: where to register (the node's); a private one when ``None``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.records_accepted = Counter(
            "potluck_overlay_records_accepted", "Peer state records merged into the view", registry=r
        )
        self.records_rejected = Counter(
            "potluck_overlay_records_rejected",
            "Peer state records rejected, by reason (unsigned, forged, stale, expired, oversized, malformed,"
            " foreign_swarm)",
            ["reason"],
            registry=r,
        )
        self.admission_refused = Counter(
            "potluck_overlay_admission_refused",
            "Peers or requests refused by admission, by reason",
            ["reason"],
            registry=r,
        )
        self.frames_rejected = Counter(
            "potluck_overlay_frames_rejected", "Garbage, oversized or schema-invalid RPC frames", registry=r
        )
        self.rpc_calls = Counter(
            "potluck_overlay_rpc_calls",
            "RPC calls served, by method and outcome",
            ["method", "outcome"],
            registry=r,
        )
        self.peers = Gauge("potluck_overlay_peers", "Peers in the cluster view (excluding this node)", registry=r)
        self.rtt = Histogram(
            "potluck_overlay_rtt_seconds", "Measured RPC ping round trips", buckets=_RTT_BUCKETS, registry=r
        )
        self.forward_resumes = Counter(
            "potluck_overlay_forward_resumes", "Forwarded completions resumed on another peer", registry=r
        )
