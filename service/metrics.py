"""Prometheus metrics of one app instance (its own registry, so tests can run several apps).

Names are a contract with ``deploy/`` (Grafana dashboard, alert rules): see the constructor.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double every counter on /metrics and no dashboard reads them.
disable_created_metrics()

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
#: label used for a domain the service does not know, so random names cannot blow up cardinality
UNKNOWN_DOMAIN_LABEL = "(unknown)"


class ServiceMetrics:
    """The service's counters, histograms and gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mdlora_requests",
            "HTTP requests by route template, domain and status code",
            ["route", "domain", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "mdlora_request_latency_seconds",
            "request latency by route template and domain",
            ["route", "domain"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.items_scored = Counter(
            "mdlora_items_scored", "candidates scored, by domain", ["domain"], registry=r
        )
        self.adapter_loads = Counter(
            "mdlora_adapter_loads",
            "adapter loads: ok, refused (failed validation) or error (registry/build failure)",
            ["result"],
            registry=r,
        )
        self.registry_version = Gauge(
            "mdlora_registry_version", "registry version the serving snapshot reflects", registry=r
        )
        self.snapshot_age = Gauge(
            "mdlora_snapshot_age_seconds",
            "seconds since the serving snapshot was built",
            registry=r,
        )
        self.registry_up = Gauge(
            "mdlora_registry_up", "1 when the adapter registry answered its last call", registry=r
        )
        self.batch_rows = Histogram(
            "mdlora_model_batch_rows",
            "rows per model call (micro-batching merges requests)",
            buckets=(1, 10, 50, 100, 200, 400, 800, 1600, 3200, 6400),
            registry=r,
        )
        self.registry_diverged = Gauge(
            "mdlora_registry_diverged",
            "1 while the registry holds less than this replica has seen (lost its data) and "
            "was not written back: the replica serves its snapshot",
            registry=r,
        )
        self.registry_losses = Counter(
            "mdlora_registry_losses",
            "times this replica found the registry behind what it had seen (lost data)",
            registry=r,
        )
        self.registry_restores = Counter(
            "mdlora_registry_restores",
            "times this replica wrote a registry that lost its data back",
            registry=r,
        )
        self.nonfinite_scores = Counter(
            "mdlora_nonfinite_scores",
            "scores the model produced that were not finite numbers (answered with an error, "
            "never sent), by domain",
            ["domain"],
            registry=r,
        )
        for result in ("ok", "refused", "error"):
            self.adapter_loads.labels(result)
        self.registry_up.set(1)

    def track_snapshot(self, created_at: Callable[[], float]) -> None:
        """Make the age gauge follow the serving snapshot's build time."""
        self.snapshot_age.set_function(lambda: time.time() - created_at())

    def observe(self, route: str, domain: str, status: int, seconds: float) -> None:
        self.requests.labels(route, domain, str(status)).inc()
        self.latency.labels(route, domain).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
