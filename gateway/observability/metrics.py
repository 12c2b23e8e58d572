"""The gateway process's own Prometheus instruments: requests, latencies, divergence.

Everything a request or a decision record tells is counted here, in the process that saw it,
on a registry passed in (tests get a fresh one each). When the gateway runs several processes,
prometheus-client's multi-process mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``rdv gateway``)
writes these values to shared files and ``/metrics`` sums them over every process. What no
single process owns (stream lengths, workers' and the log bin's counters, drift gauges) is read
from Redis at scrape time: see ``gateway.observability.metrics_state``.
"""

from __future__ import annotations

import asyncio
import glob
import os
from bisect import bisect_left
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from rendezvous.decision import DecisionRecord
from rendezvous.drift import DIVERGENCE_EDGES
from rendezvous.envelope import ModelResult
from rendezvous.names import REAL

OUTCOMES = ("real", "fallback", "split", "pinned", "timeout", "invalid", "rejected", "error")
"""``requests_total`` outcomes: answered by real, by a fallback after real's deadline, by the
A/B split's assigned challenger, by the version the request named (the Open Inference
Protocol's versioned infer, when not real's); no answer in time (504); bad input (4xx);
refused because the gateway or the stream was full (429/503); anything else (Redis down, a
bug)."""

UNKNOWN_DEPLOYMENT = "_unknown"
"""The label of requests naming a deployment that does not exist: the label set stays bounded
whatever callers send."""

REQUEST_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0)  # fmt: skip
MODEL_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0)  # fmt: skip
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 5.0)  # fmt: skip


FLUSH_S = 0.1
"""How long the request path's tallies wait before they reach prometheus-client. In
multi-process mode every value write takes a lock and writes a shared file (~1.5 µs), about a
dozen a request; batched, a flush writes once per label set and bucket touched. ``/metrics``
flushes its own process first, so only another process's figures can lag, by at most this."""


def multiprocess_dir() -> str | None:
    """The folder prometheus-client shares values through, when several processes serve."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def observe_all(child: Any, values: Iterable[float]) -> None:
    """``Histogram.observe`` for many values, writing each bucket touched and the sum once.

    prometheus-client has no batch observe; this reads the child's ``_upper_bounds``,
    ``_buckets`` (not cumulative) and ``_sum``, which ``observe`` itself uses, and falls back to
    one ``observe`` a value if they ever change shape (tests compare both ways)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            child.observe(value)
        return
    values = list(values)
    # observe() files a value in the first bucket whose bound is >= it: bisect_left. NaN
    # compares false with every bound, so observe() puts it in no bucket; keep that.
    for i, n in Tally(bisect_left(bounds, v) for v in values if v == v).items():
        buckets[i].inc(n)
    total.inc(sum(values))


class HeldAppends(Protocol):
    """The decision records' appender, as the metrics read it (``StreamAppender``)."""

    @property
    def held(self) -> int: ...

    @property
    def dropped(self) -> int: ...


class GatewayMetrics:
    """Per-process instruments. The request path only tallies in plain dicts, keyed by metric
    and labels; ``flush`` (scheduled ``FLUSH_S`` after the first tally, and run before every
    scrape) applies the tallies to prometheus-client. Label children are cached: ``labels()``
    costs a lock and a dict lookup per call."""

    def __init__(self, registry: CollectorRegistry | None = None):
        # No ``*_created`` series: a lone gateway process exposed them where the processes
        # of ``rdv serve`` (whose metrics are merged) do not (a README walkthrough)
        prometheus_client.disable_created_metrics()
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
            "Time a model spent scoring a request: its rows' share of its batch's onnxruntime "
            "call, by model version.",
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
        self.drift_dropped_rows = Counter(
            "rdv_drift_dropped_rows",
            "Feature rows left out of drift sketches because too many were waiting to be "
            "binned (drift then judges a sample of the traffic).",
            ["deployment"],
            registry=r,
        )
        self.in_flight = Gauge(
            "rdv_in_flight_requests",
            "Predict requests this gateway holds right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.decisions_held = Gauge(
            "rdv_decision_records_held",
            "Decision records held for another try while Redis fails (written once it answers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.decisions_dropped = Counter(
            "rdv_decision_records_dropped",
            "Decision records given up: Redis failed for longer than their retry window, or "
            "too many were held.",
            registry=r,
        )
        self.http_refused = Counter(
            "rdv_http_refused",
            "Requests the HTTP guard answered itself before the app saw them, by status: 400 "
            "malformed, 408 a head or body too slow, 431 a head too large.",
            ["status"],
            registry=r,
        )
        self._refusals_of: Mapping[int, int] | None = None
        self._refusals_seen: dict[int, int] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        self._decision_appends: HeldAppends | None = None
        self._dropped_seen = 0
        self._counts: defaultdict[tuple[Any, ...], float] = defaultdict(float)
        self._counted_deployments: set[str] = set()
        """Deployments whose every outcome series this process has created (at 0)."""
        self._observed: defaultdict[tuple[Any, ...], list[float]] = defaultdict(list)
        self._flush_handle: asyncio.TimerHandle | None = None
        self._in_flight_of: Callable[[], int] | None = None

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def track_in_flight(self, source: Callable[[], int]) -> None:
        """Where ``rdv_in_flight_requests`` is read from at each flush: the service's own
        count, which it keeps anyway, instead of two gauge writes a request."""
        self._in_flight_of = source

    def held_changed(self) -> None:
        """The requests held moved: ``rdv_in_flight_requests`` is written within a flush
        interval. Without it the gauge was written only when a request ended or this process
        answered a scrape, so the other gateway processes' scrapes summed a stale value."""
        self._flush_soon()

    def track_decision_appends(self, appender: HeldAppends) -> None:
        """Where the decision records' ``held`` and ``dropped`` are read from at each flush
        (a ``StreamAppender``)."""
        self._decision_appends = appender

    def track_http_refusals(self, refusals: Mapping[int, int]) -> Callable[[], None]:
        """Where ``rdv_http_refused_total`` is read from at each flush: the HTTP guard's
        process-wide tally by status (its series born at 0, so ``rate()`` sees the first).
        Returns what to call on a refusal: a flush soon, as a request's tally has."""
        self._refusals_of = refusals
        for status in (400, 408, 431):
            self._child(self.http_refused, str(status))
        return self._flush_soon

    def flush(self) -> None:
        """Apply the pending tallies to prometheus-client (and so, in multi-process mode, to
        the shared files)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        counts, self._counts = self._counts, defaultdict(float)
        observed, self._observed = self._observed, defaultdict(list)
        for (metric, *labels), amount in counts.items():
            self._child(metric, *labels).inc(amount)
        for (metric, *labels), values in observed.items():
            observe_all(self._child(metric, *labels), values)
        if self._in_flight_of is not None:
            self.in_flight.set(self._in_flight_of())
        for status, total in (self._refusals_of or {}).items():
            seen = self._refusals_seen.get(status, 0)
            if total > seen:
                self._child(self.http_refused, str(status)).inc(total - seen)
                self._refusals_seen[status] = total
        appends = self._decision_appends
        if appends is not None:
            self.decisions_held.set(appends.held)
            if appends.dropped > self._dropped_seen:
                self.decisions_dropped.inc(appends.dropped - self._dropped_seen)
                self._dropped_seen = appends.dropped

    def _flush_soon(self) -> None:
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside an event loop (a script, a test): no batching
            self.flush()
            return
        self._flush_handle = loop.call_later(FLUSH_S, self.flush)

    # -- the request path -------------------------------------------------------------------

    def drift_rows_dropped(self, deployment: str, rows: int) -> None:
        self._counts[(self.drift_dropped_rows, deployment)] += rows
        self._flush_soon()

    def request_done(self, deployment: str | None, outcome: str, seconds: float | None) -> None:
        dep = deployment or UNKNOWN_DEPLOYMENT
        if dep not in self._counted_deployments:
            # Every outcome is born at 0 with the deployment's first request, so a ratio of
            # errors reads 0 rather than nothing, and ``rate()`` sees the first error (a series
            # born holding 1 has no increase).
            self._counted_deployments.add(dep)
            for each in OUTCOMES:
                self._counts[(self.requests, dep, each)] += 0
        self._counts[(self.requests, dep, outcome)] += 1
        if seconds is not None:
            self._observed[(self.request_seconds, dep)].append(seconds)
        self._flush_soon()

    # -- decision records -----------------------------------------------------------------

    def decision(self, record: DecisionRecord) -> None:
        """Everything one decision record tells: per-role model time and queue wait, and per
        compared role the divergence and the disagreeing rows."""
        dep = record.deployment
        counts, observed = self._counts, self._observed
        counts[(self.decisions, dep)] += 1
        outputs = record.outputs
        for role, out in outputs.items():
            self._times(dep, role, out.model, out.version, out.model_latency_ms, out.queue_ms)
        if record.divergences:
            real_model = outputs[REAL].model_key
            for role, div in record.divergences.items():
                labels = (dep, role, real_model, outputs[role].model_key)
                observed[(self.divergence, *labels)].append(div.js_mean)
                counts[(self.compared_rows, *labels)] += div.rows
                # with the compared rows, at 0 too: the disagreement rate reads 0, not nothing
                counts[(self.disagreements, *labels)] += div.disagreements
        self._flush_soon()

    def late_result(self, result: ModelResult | None = None) -> None:
        """A model's result came after its request was closed: tallied as the rest, so that
        it reaches the shared files within a flush interval, whichever process is scraped
        (it waited for a scrape of this very process). Its model time and queue wait are
        observed too: only the decision records' were, and a worker stalled 7 s left the
        queue-wait histogram flat while real's entries waited 0.4-7 s (a helper's probe)."""
        self._counts[(self.late_results,)] += 1
        if result is not None:
            self._times(result.deployment, result.role, result.model, result.version,
                        result.model_latency_ms, result.queue_ms)  # fmt: skip
        self._flush_soon()

    def _times(
        self, dep: str, role: str, model: str, version: int, latency_ms: float, queue_ms: float
    ) -> None:
        """A role's model time and queue wait (its result in a decision record, or late)."""
        model_key = (self.model_seconds, dep, role, model, str(version))
        self._observed[model_key].append(latency_ms / 1000)
        self._observed[(self.queue_seconds, dep, role)].append(max(queue_ms, 0.0) / 1000)

    def scrape_registry(self, live: Collection[str] | None = None) -> CollectorRegistry:
        """The registry to expose, after this process's pending tallies: in multi-process mode
        a fresh one that sums every process's files (prometheus-client's documented way), else
        this process's own. With ``live``, the series of any other deployment are left out."""
        self.flush()
        path = multiprocess_dir()
        source = self.registry if path is None else merged_registry(path)
        if live is None:
            return source
        registry = CollectorRegistry()
        registry.register(LiveDeploymentsOnly(source, {*live, UNKNOWN_DEPLOYMENT}))
        return registry


class LiveDeploymentsOnly:
    """``source``'s metrics without the series of deployments not in ``live``: a deployment
    deleted and purged left its series in every scrape for as long as the gateway ran (its
    values stay in the multi-process files, which prometheus-client cannot take a label set
    out of), so creating and deleting deployments grew every scrape without bound."""

    def __init__(self, source: CollectorRegistry, live: Collection[str]) -> None:
        self.source = source
        self.live = live

    def collect(self) -> Iterable[Metric]:
        live = self.live
        for metric in self.source.collect():  # made afresh by each collect: ours to trim
            metric.samples = [
                s for s in metric.samples if s.labels.get("deployment", UNKNOWN_DEPLOYMENT) in live
            ]
            yield metric


class SettledFilesCollector:
    """Every process's metric files summed, as prometheus-client's ``MultiProcessCollector``
    does, but for two kinds of file:

    - one still at 0 bytes: a process creates its file and sizes it a moment later; the
      library's merge raises on a file read in that moment, and so every scrape failed while a
      process started, and for good once one was killed in it (prometheus/client_python#1199,
      open). Such a file holds nothing yet.
    - a live gauge's file of a process that no longer runs: dropped (``mark_process_dead``)
      by whoever scrapes, since a server killed outright calls nothing (uvicorn's own workers
      under ``rdv gateway`` had ``rdv_in_flight_requests`` stuck at their last value)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        settled = []
        for file in glob.glob(os.path.join(self.path, "*.db")):
            kind, _, pid = os.path.basename(file)[:-3].rpartition("_")
            if kind.startswith("gauge_live") and pid.isdigit() and not _running(int(pid)):
                mark_process_dead(int(pid), self.path)
                continue
            try:
                if os.stat(file).st_size > 0:
                    settled.append(file)
            except FileNotFoundError:  # a live gauge's file, dropped by mark_process_dead
                continue
        return MultiProcessCollector.merge(settled, accumulate=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def merged_registry(path: str) -> CollectorRegistry:
    """A fresh registry that sums the metric files of every process under ``path``."""
    registry = CollectorRegistry()
    registry.register(SettledFilesCollector(path))
    return registry
