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
        # canary rollouts and online feedback (service.rollout, service.feedback)
        self.rollout_requests = Counter(
            "mdlora_rollout_requests",
            "requests of domains with a running rollout, by the arm that answered (canary, stable)",
            ["division", "domain", "arm"],
            registry=r,
        )
        self.rollout_percent = Gauge(
            "mdlora_rollout_canary_percent",
            "target share (%) of a domain's users on its canary; 0 when no rollout runs",
            ["division", "domain"],
            registry=r,
        )
        self.rollout_decisions = Counter(
            "mdlora_rollout_decisions",
            "rollout starts, promotions and aborts made on this replica, by who (admin, guard)",
            ["decision", "by"],
            registry=r,
        )
        self.guard_aborts = Counter(
            "mdlora_rollout_guard_aborts",
            "canaries the guard aborted, by domain and the check that failed (logloss, "
            "calibration)",
            ["division", "domain", "check"],
            registry=r,
        )
        self.feedback_events = Counter(
            "mdlora_feedback_events",
            "feedback events: joined (recorded), duplicate, refused (their batch answered 4xx)",
            ["result"],
            registry=r,
        )
        labels = ["division", "domain", "version"]
        self.feedback_window = {
            name: Gauge(f"mdlora_feedback_{name}", text, labels, registry=r)
            for name, text in (
                ("count", "feedback events in the sliding window, per domain and version"),
                ("mean_score", "mean served score of the window's events"),
                ("ctr", "observed click rate of the window's events"),
                ("calibration", "mean score over observed click rate (1 is calibrated)"),
                ("logloss", "log loss of the served scores over the window"),
                ("auc", "AUC of the served scores over the window"),
            )
        }
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
