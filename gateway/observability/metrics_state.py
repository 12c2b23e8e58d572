"""What ``/metrics`` reads from Redis at scrape time: the state no single process owns.

Stream lengths and consumer-group pending counts, live workers, the counters that model
workers and log-bin processes publish into Redis with their heartbeats (they have no HTTP port
of their own), and the drift monitor's latest evaluation. One pipelined round trip per scrape,
whichever gateway process answers it, so every process exposes the same figures.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.observability.live_accuracy import accuracy_families
from rendezvous import names
from rendezvous.bus.connection import AsyncClient
from rendezvous.drift_alerts import ALL_ALERT_KINDS

STALE_STATS_S = 60.0
"""Counters of a process that has not published for this long are not exposed (it died)."""
FORGET_STATS_S = 600.0
"""... and after this long they are deleted, so that the hashes do not grow with every
restart of a worker named after its pid. A live process publishes its whole counters at each
heartbeat, so one that was only stalled loses nothing."""

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


@dataclass
class DeploymentState:
    input_length: int = 0
    decisions_length: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    """XINFO GROUPS of each input partition, each with its ``partition`` number added."""
    live_workers: dict[str, int] = field(default_factory=dict)
    worker_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``role|consumer`` -> the JSON counters it published."""
    drift: dict[str, Any] | None = None
    drift_alerts: set[str] = field(default_factory=set)
    """Kinds of the active drift alerts (``drift_store``: every source's)."""
    drift_raised: dict[str, int] = field(default_factory=dict)
    """Kind -> drift alerts raised."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Role -> input entries its group was moved past (``RDV_MAX_ROLE_LAG``)."""
    accuracy: dict[str, Any] | None = None
    """The live-accuracy report (``live_accuracy``), once a label came in."""


@dataclass
class ClusterState:
    deployments: dict[str, DeploymentState] = field(default_factory=dict)
    logbin_stats: dict[str, dict[str, Any]] = field(default_factory=dict)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fresh_stats(
    raw: Mapping[bytes, bytes], now_s: float, forget: list[bytes]
) -> dict[str, dict[str, Any]]:
    """The counters published in the last ``STALE_STATS_S``; appends to ``forget`` the fields
    older than ``FORGET_STATS_S`` (or unreadable)."""
    out = {}
    for key, value in raw.items():
        try:
            doc = json.loads(value)
            age_s = now_s - float(doc.get("ts", 0))
        except (ValueError, TypeError, AttributeError):
            forget.append(key)
            continue
        if age_s <= STALE_STATS_S:
            out[_text(key)] = doc
        elif age_s > FORGET_STATS_S:
            forget.append(key)
    return out


async def read_state(
    client: AsyncClient,
    deployments: Mapping[str, Sequence[str]] | Sequence[str],
    heartbeat_timeout_s: float,
) -> ClusterState:
    """``deployments``: names, or names -> their input streams (default: the first only)."""
    now = time.time()
    streams = (
        dict(deployments)
        if isinstance(deployments, Mapping)
        else {dep: [names.input_stream(dep)] for dep in deployments}
    )
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(names.LOGBIN_STATS)
    for dep, inputs in streams.items():
        pipe.xlen(names.decisions_stream(dep))
        pipe.zrangebyscore(names.workers_key(dep), now - heartbeat_timeout_s, "+inf")
        pipe.hgetall(names.stats_key(dep))
        pipe.get(names.drift_report_key(dep))
        pipe.hgetall(names.skipped_key(dep))
        pipe.hvals(names.drift_alerts_key(dep))
        pipe.hgetall(names.drift_event_counts_key(dep))
        pipe.get(names.accuracy_key(dep))
        for stream in inputs:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
    replies = await pipe.execute(raise_on_error=False)
    state = ClusterState()
    forget: dict[str, list[bytes]] = {}
    if isinstance(replies[0], dict):
        state.logbin_stats = _fresh_stats(
            replies[0], now, forget.setdefault(names.LOGBIN_STATS, [])
        )
    at = 1
    for dep, inputs in streams.items():
        n = len(inputs)
        xlen_dec, live, stats, report, skipped, alerts, raised, accuracy = replies[at : at + 8]
        per_partition = replies[at + 8 : at + 8 + 2 * n]
        at += 8 + 2 * n
        ds = DeploymentState()
        ds.input_length = sum(x for x in per_partition[0::2] if isinstance(x, int))
        ds.decisions_length = xlen_dec if isinstance(xlen_dec, int) else 0
        for k, groups in enumerate(per_partition[1::2]):
            if isinstance(groups, list):  # no stream yet: an error
                ds.groups += [{**group, "partition": k} for group in groups]
        if isinstance(live, list):
            for member in live:
                role = _text(member).split("|", 1)[0]
                ds.live_workers[role] = ds.live_workers.get(role, 0) + 1
        if isinstance(stats, dict):
            ds.worker_stats = _fresh_stats(stats, now, forget.setdefault(names.stats_key(dep), []))
        if isinstance(report, bytes | str):
            try:
                ds.drift = json.loads(report)
            except ValueError:
                ds.drift = None
        if isinstance(accuracy, bytes | str):
            with contextlib.suppress(ValueError):
                ds.accuracy = json.loads(accuracy)
        if isinstance(skipped, dict):
            ds.skipped = {_text(role): int(n) for role, n in skipped.items()}
        for alert in alerts if isinstance(alerts, list) else []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                ds.drift_alerts.add(str(json.loads(alert)["kind"]))
        if isinstance(raised, dict):
            ds.drift_raised = {_text(kind): int(n) for kind, n in raised.items()}
        state.deployments[dep] = ds
    await _forget(client, forget)
    return state


async def _forget(client: AsyncClient, fields: dict[str, list[bytes]]) -> None:
    """Delete long-dead publishers' counters (a round trip only when there are some)."""
    pipe = client.pipeline(transaction=False)
    for key, keys in fields.items():
        if keys:
            pipe.hdel(key, *keys)
    if len(pipe):
        await pipe.execute(raise_on_error=False)


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
        consumers = _gauge(
            "rdv_stream_group_consumers",
            "Consumers in a group.",
            ["deployment", "group", "partition"],
        )
        live = _gauge(
            "rdv_live_workers", "Workers whose heartbeat is fresh, by role.", ["deployment", "role"]
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
                if group.get("lag") is not None:
                    lag.add_metric(labels, int(group["lag"]))
            for role, n in sorted(roles.items()):
                live.add_metric([dep, role], n)
        yield from (length, pending, lag, consumers, live, skipped)

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
            for family, value in (
                (score_psi, score.get("psi")),
                (score_js, score.get("js_distance")),
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
