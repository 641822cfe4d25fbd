"""Prometheus metrics of one node, in a registry of its own (no module globals).

Exposed at ``GET /metrics`` in the Prometheus text format (prometheus-client).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_COMPLETION_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class NodeMetrics:
    """The node's counters, histograms and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "potluck_requests", "HTTP API requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.tokens_generated = Counter(
            "potluck_tokens_generated", "Completion tokens generated", ["model"], registry=r
        )
        self.prompt_tokens = Counter("potluck_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.cancelled = Counter(
            "potluck_generations_cancelled", "Generations stopped because the client went away", registry=r
        )
        self.ttft = Histogram(
            "potluck_ttft_seconds", "Time to first token, seconds", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "potluck_request_latency_seconds",
            "Completion request latency, seconds",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("potluck_queue_depth", "Requests waiting for a model", registry=r)

    def track_queue_depth(self, fn: Callable[[], float]) -> None:
        """Read the queue depth from ``fn`` at scrape time."""
        self.queue_depth.set_function(fn)

    def totals(self) -> dict[str, float]:
        """The counters the dashboard plots, summed over their labels.

        Returns:
            ``tokens`` (completion tokens generated), ``requests`` (completion requests answered,
            any status), ``rate_limited`` (of those, HTTP 429) and ``errors`` (HTTP 5xx, any endpoint).
        """
        out = {"tokens": 0.0, "requests": 0.0, "rate_limited": 0.0, "errors": 0.0}
        for metric in self.tokens_generated.collect():
            out["tokens"] += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        for metric in self.requests.collect():
            for s in metric.samples:
                if not s.name.endswith("_total"):
                    continue
                status = s.labels.get("status", "")
                if s.labels.get("endpoint", "") in _COMPLETION_ENDPOINTS:
                    out["requests"] += s.value
                    if status == "429":
                        out["rate_limited"] += s.value
                if status.startswith("5"):
                    out["errors"] += s.value
        return out

    def render(self) -> bytes:
        """The exposition-format text."""
        return generate_latest(self.registry)
