"""The gateway process's own Prometheus instruments: requests, latencies, divergence.

Everything a request or a decision record tells is counted here, in the process that saw it,
on a registry passed in (tests get a fresh one each). When the gateway runs several processes,
prometheus-client's multi-process mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``rdv gateway``)
writes these values to shared files and ``/metrics`` sums them over every process. What no
single process owns (stream lengths, workers' and the log bin's counters, drift gauges) is read
from Redis at scrape time: see ``gateway.metrics_state``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

from rendezvous.drift import DIVERGENCE_EDGES

OUTCOMES = ("real", "fallback", "split", "timeout", "invalid", "rejected", "error")
"""``requests_total`` outcomes: answered by real, by a fallback after real's deadline, by the
A/B split's assigned challenger; no answer in time (504); bad input (4xx); refused because the
gateway or the stream was full (429/503); anything else (Redis down, a bug)."""

UNKNOWN_DEPLOYMENT = "_unknown"
"""The label of requests naming a deployment that does not exist: the label set stays bounded
whatever callers send."""

REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
MODEL_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
QUEUE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    5.0,
)


def multiprocess_dir() -> str | None:
    """The folder prometheus-client shares values through, when several processes serve."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class GatewayMetrics:
    """Per-process instruments. Label children are cached: ``labels()`` costs a lock and a
    dict lookup per call, and the request path calls these several times per request."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rdv_requests",
            "Predict requests by deployment and outcome.",
            ["deployment", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "rdv_request_duration_seconds",
            "End-to-end predict latency inside the gateway (answered and timed-out requests).",
            ["deployment"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.model_seconds = Histogram(
            "rdv_model_latency_seconds",
            "Time a model spent scoring a request (its onnxruntime call), by model version.",
            ["deployment", "role", "model", "version"],
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "rdv_queue_wait_seconds",
            "Time a request waited in the input stream before a worker of the role read it.",
            ["deployment", "role"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.divergence = Histogram(
            "rdv_divergence_js_distance",
            "Per-request Jensen-Shannon distance (base 2) between real's and another role's "
            "probabilities.",
            ["deployment", "role", "real_model", "other_model"],
            buckets=DIVERGENCE_EDGES[1:],
            registry=r,
        )
        self.disagreements = Counter(
            "rdv_label_disagreements",
            "Rows whose label differs between real and another role.",
            ["deployment", "role", "real_model", "other_model"],
            registry=r,
        )
        self.compared_rows = Counter(
            "rdv_compared_rows",
            "Rows scored by both real and another role (the denominator of the disagreement rate).",
            ["deployment", "role", "real_model", "other_model"],
            registry=r,
        )
        self.decisions = Counter(
            "rdv_decisions",
            "Decision records written, by deployment.",
            ["deployment"],
            registry=r,
        )
        self.late_results = Counter(
            "rdv_late_results",
            "Model results that reached this gateway after their request's record was closed.",
            registry=r,
        )
        self.in_flight = Gauge(
            "rdv_in_flight_requests",
            "Predict requests this gateway holds right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._late_seen = 0

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- the request path -------------------------------------------------------------------

    def request_done(self, deployment: str | None, outcome: str, seconds: float | None) -> None:
        dep = deployment or UNKNOWN_DEPLOYMENT
        self._child(self.requests, dep, outcome).inc()
        if seconds is not None:
            self._child(self.request_seconds, dep).observe(seconds)

    # -- decision records -----------------------------------------------------------------

    def decision(self, record: Mapping[str, Any]) -> None:
        """Everything one decision record tells: per-role model time and queue wait, and per
        compared role the divergence and the disagreeing rows."""
        dep = record["deployment"]
        self._child(self.decisions, dep).inc()
        for role, out in record["outputs"].items():
            version = str(out.get("version"))
            self._child(self.model_seconds, dep, role, out["model"], version).observe(
                out["model_latency_ms"] / 1000
            )
            self._child(self.queue_seconds, dep, role).observe(max(out["queue_ms"], 0.0) / 1000)
        for role, div in (record.get("divergences") or {}).items():
            real_model, other_model = div["pair"]
            labels = (dep, role, real_model, other_model)
            self._child(self.divergence, *labels).observe(div["js_mean"])
            self._child(self.compared_rows, *labels).inc(div["rows"])
            if div["disagreements"]:
                self._child(self.disagreements, *labels).inc(div["disagreements"])

    def sync_late_results(self, total: int) -> None:
        """The matcher counts late results in a plain int (the reply loop is hot); bring the
        counter up to it before a scrape."""
        if total > self._late_seen:
            self.late_results.inc(total - self._late_seen)
            self._late_seen = total

    def scrape_registry(self) -> CollectorRegistry:
        """The registry to expose: in multi-process mode a fresh one that sums every
        process's files (prometheus-client's documented way), else this process's own."""
        path = multiprocess_dir()
        if path is None:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
        return registry
