"""The state no single process owns, as Prometheus families: one ``ClusterState`` snapshot
(``cluster_state``, read at scrape time by whichever gateway process answers, so every process
exposes the same figures) turned into stream, group, worker, log-bin, drift and accuracy series.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.observability.cluster_state import ClusterState, DeploymentState
from gateway.observability.live_accuracy import accuracy_families
from models.worker_versions import stale_workers
from rendezvous import names
from rendezvous.bus.connection import text as _text
from rendezvous.drift_alerts import ALL_ALERT_KINDS

WORKER_COUNTERS = ("scored", "rows", "batches", "expired", "malformed", "errors", "reclaimed")
LOGBIN_COUNTERS = ("records", "bytes_written", "batches", "undecodable", "errors", "trimmed")
_COUNTER_HELP = {
    "scored": "Requests scored",
    "rows": "Rows scored",
    "batches": "Batches read",
    "expired": "Requests skipped because their deadline had passed",
    "malformed": "Entries that could not be decoded",
    "errors": "Failures the loop rode out",
    "reclaimed": "Entries taken over from dead consumers",
    "records": "Records archived",
    "bytes_written": "Compressed bytes written to archive segments",
    "undecodable": "Records archived that could not be decoded",
    "trimmed": "Input-stream entries trimmed behind the slowest group",
}


def _gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _quantiles(name: str, doc: str) -> GaugeMetricFamily:
    """Quantiles over the drift window, by ``deployment`` and ``quantile``: typed a summary,
    the one type a ``quantile`` label may have (``promtool check metrics``); the series are
    those of a gauge (no ``_sum`` or ``_count``: the window is not a running total)."""
    family = _gauge(name, doc, ["deployment", "quantile"])
    family.type = "summary"
    return family


class ClusterStateCollector(Collector):
    """Exposes one ``ClusterState`` snapshot (a fresh collector per scrape)."""

    def __init__(self, state: ClusterState):
        self.state = state

    def collect(self) -> Iterable[Any]:
        yield from self._streams()
        yield from self._workers()
        yield from self._logbin()
        yield from self._drift()
        yield from accuracy_families(
            {dep: ds.accuracy for dep, ds in self.state.deployments.items() if ds.accuracy}
        )

    def _streams(self) -> Iterator[Any]:
        length = _gauge(
            "rdv_stream_length", "Entries in a deployment's stream.", ["deployment", "stream"]
        )
        pending = _gauge(
            "rdv_stream_group_pending",
            "Entries delivered to a consumer group of the input stream and not yet acked.",
            ["deployment", "group", "partition"],
        )
        lag = _gauge(
            "rdv_stream_group_lag",
            "Entries of the input stream not yet delivered to a consumer group (Redis 7+).",
            ["deployment", "group", "partition"],
        )
        waiting = _gauge(
            "rdv_stream_group_lag_seconds",
            "How long the oldest input entry not yet delivered to a consumer group has waited "
            "(0 when none waits): how far behind the role or log bin is, on every Redis.",
            ["deployment", "group", "partition"],
        )
        consumers = _gauge(
            "rdv_stream_group_consumers",
            "Consumers in a group.",
            ["deployment", "group", "partition"],
        )
        live = _gauge(
            "rdv_live_workers", "Workers whose heartbeat is fresh, by role.", ["deployment", "role"]
        )
        stale = _gauge(
            "rdv_stale_workers",
            "Live workers serving another model version than the deployment names for their "
            "role (one that cannot load the new version serves the old): 0 once all have "
            "loaded it, a second or two after a change.",
            ["deployment", "role"],
        )
        skipped = CounterMetricFamily(
            "rdv_role_skipped_entries",
            "Input entries a model role's group was moved past because it fell more than "
            "RDV_MAX_ROLE_LAG behind (its worker down or too slow): never scored by it.",
            labels=["deployment", "role"],
        )
        for dep, ds in sorted(self.state.deployments.items()):
            roles = _every_role(ds)
            # 0 before the first skip, so that increase() sees that skip (a series born
            # holding its whole count is one increase() misses)
            for role, n in sorted({**dict.fromkeys(roles, 0), **ds.skipped}.items()):
                skipped.add_metric([dep, role], n)
            length.add_metric([dep, "input"], ds.input_length)
            length.add_metric([dep, "decisions"], ds.decisions_length)
            for group in ds.groups:
                labels = [dep, _text(group["name"]), str(group["partition"])]
                pending.add_metric(labels, int(group.get("pending", 0)))
                consumers.add_metric(labels, int(group.get("consumers", 0)))
                waiting.add_metric(labels, float(group.get("waiting_s", 0.0)))
                if group.get("lag") is not None:
                    lag.add_metric(labels, int(group["lag"]))
            for role, n in sorted(roles.items()):
                live.add_metric([dep, role], n)
            if ds.roles:  # known to the gateway that read the state
                lagging = stale_workers(ds.roles, ds.live_members, ds.worker_stats)
                for role in sorted(ds.roles):
                    stale.add_metric([dep, role], len(lagging.get(role, ())))
        yield from (length, pending, lag, waiting, consumers, live, stale, skipped)

    def _workers(self) -> Iterator[Any]:
        labels = ["deployment", "role", "consumer"]
        families = {
            key: CounterMetricFamily(
                f"rdv_worker_{key}", f"{_COUNTER_HELP[key]} by a model worker.", labels=labels
            )
            for key in WORKER_COUNTERS
        }
        inference = CounterMetricFamily(
            "rdv_worker_inference_seconds",
            "Time a model worker spent in onnxruntime.",
            labels=labels,
        )
        for dep, ds in sorted(self.state.deployments.items()):
            for member, doc in sorted(ds.worker_stats.items()):
                role, _, consumer = member.partition("|")
                for key, family in families.items():
                    if key in doc:
                        family.add_metric([dep, role, consumer], float(doc[key]))
                if "inference_s" in doc:
                    inference.add_metric([dep, role, consumer], float(doc["inference_s"]))
        yield from families.values()
        yield inference

    def _logbin(self) -> Iterator[Any]:
        families = {
            key: CounterMetricFamily(
                f"rdv_logbin_{key}", f"{_COUNTER_HELP[key]} by the log bin.", labels=["consumer"]
            )
            for key in LOGBIN_COUNTERS
        }
        failing = _gauge(
            "rdv_logbin_failing",
            "1 while the log bin cannot archive (its last write failed), else 0.",
            ["consumer"],
        )
        for consumer, doc in sorted(self.state.logbin_stats.items()):
            for key, family in families.items():
                if key in doc:
                    family.add_metric([consumer], float(doc[key]))
            failing.add_metric([consumer], 1.0 if doc.get("failing") else 0.0)
        yield from families.values()
        yield failing

    def _drift(self) -> Iterator[Any]:
        dep_only = ["deployment"]
        score_psi = _gauge(
            "rdv_drift_score_psi",
            "Population stability index of real's score "
            "distribution in the window against its reference.",
            dep_only,
        )
        score_js = _gauge(
            "rdv_drift_score_js_distance",
            "Jensen-Shannon distance of real's score distribution against its reference.",
            dep_only,
        )
        class_psi = _gauge(
            "rdv_drift_class_psi",
            "Population stability index of a multiclass real model's predicted-class mix in "
            "the window against its reference.",
            dep_only,
        )
        class_js = _gauge(
            "rdv_drift_class_js_distance",
            "Jensen-Shannon distance of a multiclass real model's predicted-class mix against "
            "its reference.",
            dep_only,
        )
        feature_psi = _gauge(
            "rdv_drift_feature_psi",
            "Population stability index of a "
            "feature in the window against its training distribution.",
            ["deployment", "feature"],
        )
        feature_max = _gauge("rdv_drift_feature_psi_max", "The largest feature PSI.", dep_only)
        div_mean = _gauge(
            "rdv_drift_divergence_mean",
            "Mean per-request JS distance real vs canary in the window.",
            dep_only,
        )
        div_q = _quantiles(
            "rdv_drift_divergence_quantile",
            "Quantiles of the per-request JS distance real vs canary in the window.",
        )
        disagree = _gauge(
            "rdv_drift_disagreement_ratio",
            "Share of rows in the window where real's and canary's labels differ.",
            dep_only,
        )
        window = _gauge("rdv_drift_window_requests", "Requests in the drift window.", dep_only)
        ood = _gauge(
            "rdv_drift_ood_ratio",
            "Share of rows in the window with a feature outside the training range.",
            dep_only,
        )
        ood_q = _quantiles(
            "rdv_drift_ood_distance_quantile",
            "Quantiles of the rows' distance to the training centre in the window (the decision "
            "records' ood.distance: about 1 for a training row).",
        )
        alert = _gauge(
            "rdv_drift_alert",
            "1 while a drift alert of this kind is active.",
            ["deployment", "kind"],
        )
        events = CounterMetricFamily(
            "rdv_drift_events", "Drift alerts raised.", labels=["deployment", "kind"]
        )
        evaluated = _gauge(
            "rdv_drift_evaluated_timestamp_seconds", "When drift was last evaluated.", dep_only
        )
        for dep, ds in sorted(self.state.deployments.items()):
            for kind in ALL_ALERT_KINDS:
                alert.add_metric([dep, kind], 1.0 if kind in ds.drift_alerts else 0.0)
                events.add_metric([dep, kind], float(ds.drift_raised.get(kind, 0)))
            report = ds.drift
            if not report:
                continue
            if report.get("evaluated_at_ms"):
                evaluated.add_metric([dep], report["evaluated_at_ms"] / 1000)
            current = report.get("current") or {}
            if current.get("requests") is not None:
                window.add_metric([dep], current["requests"])
            if current.get("status") != "ok":
                continue
            score = current.get("score") or {}
            div = current.get("divergence") or {}
            features = current.get("features") or {}
            classes = current.get("classes") or {}
            for family, value in (
                (score_psi, score.get("psi")),
                (score_js, score.get("js_distance")),
                (class_psi, classes.get("psi")),
                (class_js, classes.get("js_distance")),
                (feature_max, features.get("max_psi")),
                (div_mean, div.get("mean")),
                (disagree, div.get("disagreement_rate")),
            ):
                if value is not None:
                    family.add_metric([dep], value)
            for key, quantile in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):
                if div.get(key) is not None:
                    div_q.add_metric([dep, quantile], div[key])
            for feature, value in sorted((features.get("psi") or {}).items()):
                feature_psi.add_metric([dep, feature], value)
            evidence = current.get("ood") or {}
            if evidence.get("rate") is not None:
                ood.add_metric([dep], evidence["rate"])
            for key, value in (evidence.get("distance") or {}).items():
                if value is not None and key in _QUANTILES:
                    ood_q.add_metric([dep, _QUANTILES[key]], value)
        yield from (
            score_psi,
            score_js,
            class_psi,
            class_js,
            feature_psi,
            feature_max,
            div_mean,
            div_q,
            disagree,
            window,
            ood,
            ood_q,
            alert,
            events,
            evaluated,
        )


_QUANTILES = {"p50": "0.5", "p90": "0.9", "p99": "0.99"}


def state_registry(state: ClusterState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterStateCollector(state))
    return registry


def _every_role(ds: DeploymentState) -> dict[str, int]:
    """Live workers of every role that has a group on the input stream, 0 where none is: a
    role whose workers all died must read 0 (what an alert on ``rdv_live_workers == 0`` or a
    dashboard tile needs), not vanish."""
    roles = {
        group_name[len(names.MODEL_GROUP_PREFIX) :]: 0
        for group in ds.groups
        if (group_name := _text(group["name"])).startswith(names.MODEL_GROUP_PREFIX)
    }
    return {**roles, **ds.live_workers}
