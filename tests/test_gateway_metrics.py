"""The gateway's instruments (gateway.observability.metrics): tallies batched off the request
path must
expose exactly what one prometheus-client call per event would have."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.metrics import (
    FLUSH_S,
    OUTCOMES,
    REQUEST_BUCKETS,
    GatewayMetrics,
    merged_registry,
    observe_all,
)
from rendezvous.decision import BinOutput, DecisionRecord
from rendezvous.divergence import Divergence
from rendezvous.envelope import ModelResult

ON_BOUNDS = [*REQUEST_BUCKETS, 0.0, -1.0, 1e-9, 0.0042, 7.5, 100.0, 0.0042]


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """Every sample but the creation timestamps, which differ between two registries."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def histogram(registry: CollectorRegistry) -> Any:
    return Histogram("h", "a histogram", ["k"], buckets=REQUEST_BUCKETS, registry=registry)


def test_observe_all_matches_observe_one_by_one() -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    child = histogram(one_by_one).labels("x")
    for v in ON_BOUNDS:
        child.observe(v)
    observe_all(histogram(batched).labels("x"), ON_BOUNDS)
    expected = samples(one_by_one)
    assert samples(batched) == expected
    assert expected[("h_count", frozenset({"k": "x"}.items()))] == len(ON_BOUNDS)
    # a value exactly on a bound counts in that bound's bucket: 0.0005 itself, 0, -1, 1e-9
    assert expected[("h_bucket", frozenset({"k": "x", "le": "0.0005"}.items()))] == 4


def test_observe_all_keeps_observes_handling_of_nan() -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    histogram(one_by_one).labels("x").observe(math.nan)
    observe_all(histogram(batched).labels("x"), [math.nan])
    a, b = samples(one_by_one), samples(batched)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_observe_all_falls_back_when_the_internals_are_not_there() -> None:
    seen: list[float] = []

    class Plain:
        def observe(self, value: float) -> None:
            seen.append(value)

    observe_all(Plain(), [0.1, 0.2])
    assert seen == [0.1, 0.2]


def record(divergence: float, disagreements: int) -> DecisionRecord:
    def out(model: str, queue_ms: float) -> BinOutput:
        return BinOutput(model, 3, 0.2, queue_ms, 2.0, [0, 1], [[0.6, 0.4], [0.3, 0.7]])

    div = Divergence(rows=2, disagreements=disagreements, abs_diff_mean=0.1, abs_diff_max=0.2,
                     js_mean=divergence, js_max=divergence)  # fmt: skip
    return DecisionRecord(
        request_id="r",
        deployment="d",
        ts_ms=0.0,
        outcome="real",
        chosen_role="real",
        answered_after_ms=2.0,
        outputs={"real": out("m", 1.5), "canary": out("c", -0.1)},
        missing=(),
        divergences={"canary": div},
    )


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return samples(metrics.registry).get((name, frozenset(labels.items())), 0.0)


def test_the_series_of_a_ratio_exist_from_the_first_request() -> None:
    """Found by hand: a deployment that never failed had no error series, so the Grafana error
    ratio read "No data" rather than 0 and the first error was no ``rate()`` increase (a series
    born holding 1); the same for the disagreements of a canary that always agreed."""
    metrics = GatewayMetrics()  # no event loop: every tally is written at once
    metrics.request_done("d", "real", 0.004)
    metrics.decision(record(0.1, 0))
    got = samples(metrics.registry)
    for outcome in OUTCOMES:
        key = ("rdv_requests_total", frozenset({"deployment": "d", "outcome": outcome}.items()))
        assert got.get(key) == (1.0 if outcome == "real" else 0.0), outcome
    pair = {"deployment": "d", "role": "canary", "real_model": "m:3", "other_model": "c:3"}
    assert got.get(("rdv_label_disagreements_total", frozenset(pair.items()))) == 0.0
    assert got.get(("rdv_compared_rows_total", frozenset(pair.items()))) == 2.0


def test_tallies_reach_the_registry_a_flush_interval_later_or_at_a_scrape() -> None:
    async def scenario() -> None:
        metrics = GatewayMetrics()
        in_flight = [3]
        metrics.track_in_flight(lambda: in_flight[0])
        metrics.request_done("d", "real", 0.004)
        metrics.request_done(None, "invalid", None)
        metrics.decision(record(0.25, 1))
        metrics.decision(record(0.5, 0))
        # nothing written yet: the request path only tallied
        assert value(metrics, "rdv_requests_total", deployment="d", outcome="real") == 0
        await asyncio.sleep(FLUSH_S * 3)
        assert value(metrics, "rdv_requests_total", deployment="d", outcome="real") == 1
        assert value(metrics, "rdv_requests_total", deployment="_unknown", outcome="invalid") == 1
        assert value(metrics, "rdv_request_duration_seconds_count", deployment="d") == 1
        assert value(metrics, "rdv_decisions_total", deployment="d") == 2
        pair = {"deployment": "d", "role": "canary", "real_model": "m:3", "other_model": "c:3"}
        assert value(metrics, "rdv_divergence_js_distance_sum", **pair) == 0.75
        assert value(metrics, "rdv_compared_rows_total", **pair) == 4
        assert value(metrics, "rdv_label_disagreements_total", **pair) == 1
        model = {"deployment": "d", "role": "real", "model": "m", "version": "3"}
        assert value(metrics, "rdv_model_latency_seconds_count", **model) == 2
        queue = {"deployment": "d", "role": "canary"}
        assert value(metrics, "rdv_queue_wait_seconds_count", **queue) == 2
        assert value(metrics, "rdv_queue_wait_seconds_sum", **queue) == 0.0  # negative: 0
        assert value(metrics, "rdv_in_flight_requests") == 3

        in_flight[0] = 0
        metrics.request_done("d", "real", 0.002)
        registry = metrics.scrape_registry()  # a scrape does not wait for the timer
        assert (
            samples(registry)[
                ("rdv_requests_total", frozenset({"deployment": "d", "outcome": "real"}.items()))
            ]
            == 2
        )
        assert value(metrics, "rdv_in_flight_requests") == 0

    asyncio.run(scenario())


def test_outside_an_event_loop_each_call_is_written_at_once() -> None:
    metrics = GatewayMetrics()
    metrics.request_done("d", "timeout", 0.6)
    assert value(metrics, "rdv_requests_total", deployment="d", outcome="timeout") == 1
    assert value(metrics, "rdv_request_duration_seconds_sum", deployment="d") == 0.6


def test_feature_rows_the_drift_feed_leaves_out_are_counted() -> None:
    import numpy as np
    import redis.asyncio as aioredis

    from gateway.dataplane.deployments import DeploymentCache
    from gateway.observability.drift_feed import MAX_PENDING_ROWS, DriftFeed

    metrics = GatewayMetrics()
    client = aioredis.Redis()  # never connected: observing rows does no I/O
    feed = DriftFeed(client, DeploymentCache(client), on_dropped=metrics.drift_rows_dropped)
    rows = np.zeros((MAX_PENDING_ROWS // 2, 3), np.float32)
    for _ in range(2):
        feed.observe_rows("dep", rows)  # fills the pending rows to the bound
    feed.observe_rows("dep", rows[:7])
    feed.observe_rows("dep", rows[:5])
    metrics.flush()
    assert (
        samples(metrics.registry)[
            ("rdv_drift_dropped_rows_total", frozenset({("deployment", "dep")}))
        ]
        == 12
    )


def test_late_results_reach_the_registry_a_flush_interval_later() -> None:
    """Found by hand: late results were brought to the counter only by a scrape of the
    process that saw them, so a process rarely scraped (Prometheus keeps one connection to one
    of them) held its count for minutes, and a killed one lost it."""

    async def scenario() -> None:
        metrics = GatewayMetrics()
        for _ in range(3):
            metrics.late_result()
        assert value(metrics, "rdv_late_results_total") == 0
        await asyncio.sleep(FLUSH_S * 3)
        assert value(metrics, "rdv_late_results_total") == 3

    asyncio.run(scenario())


def test_a_late_results_queue_wait_and_model_time_are_observed() -> None:
    """Found by a helper's metrics probe: only the decision records' times were observed, so a
    worker stalled 7 s left ``rdv_queue_wait_seconds`` flat while real's entries waited
    0.4-7 s: the slow results are the late ones."""
    metrics = GatewayMetrics()  # no event loop: every tally is written at once
    late = ModelResult("r", "d", "m", 3, "real", [1], np.array([[0.2, 0.8]], np.float32),
                       [0, 1], model_latency_ms=2.0, queue_ms=6_500.0)  # fmt: skip
    metrics.late_result(late)
    got = samples(metrics.registry)
    assert got[("rdv_queue_wait_seconds_count", frozenset({("deployment", "d"),
                                                           ("role", "real")}))] == 1  # fmt: skip
    assert got[("rdv_queue_wait_seconds_sum", frozenset({("deployment", "d"),
                                                         ("role", "real")}))] == 6.5  # fmt: skip
    assert value(metrics, "rdv_late_results_total") == 1


def test_decision_records_held_and_dropped_are_read_at_each_flush() -> None:
    """The appender counts; the metrics read its figures at a flush, the dropped as a counter
    that only grows by what is new."""

    class Appends:
        held = 0
        dropped = 0

    metrics, appends = GatewayMetrics(), Appends()
    metrics.track_decision_appends(appends)
    appends.held, appends.dropped = 7, 2
    metrics.flush()
    assert value(metrics, "rdv_decision_records_held") == 7
    assert value(metrics, "rdv_decision_records_dropped_total") == 2
    appends.held, appends.dropped = 0, 5
    metrics.flush()
    metrics.flush()
    assert value(metrics, "rdv_decision_records_held") == 0
    assert value(metrics, "rdv_decision_records_dropped_total") == 5


def test_the_http_guards_refusals_are_read_at_each_flush_by_status() -> None:
    """The guard tallies in its process; the metrics add what is new at a flush, each status's
    series there at 0 from the start."""
    metrics, refused = GatewayMetrics(), Counter[int]()
    metrics.track_http_refusals(refused)
    metrics.flush()
    for status in ("400", "408", "431"):
        assert ("rdv_http_refused_total", frozenset({("status", status)})) in samples(
            metrics.registry
        )
    refused[400] += 3
    refused[431] += 1
    metrics.flush()
    metrics.flush()
    refused[400] += 1
    metrics.flush()
    assert value(metrics, "rdv_http_refused_total", status="400") == 4
    assert value(metrics, "rdv_http_refused_total", status="431") == 1
    assert value(metrics, "rdv_http_refused_total", status="408") == 0


def test_a_metrics_file_caught_before_it_is_sized_does_not_fail_the_scrape(
    tmp_path: Path,
) -> None:
    """A process creates its metric file and sizes it a moment later; a scrape in that moment,
    or ever after if the process was killed in it, raised in prometheus-client's merge and
    ``/metrics`` answered 500 (CI caught it in the supervisor's test). The other processes'
    figures are still summed."""
    writer = (
        "from prometheus_client import Counter, Gauge\n"
        "Counter('served', 's').inc(7)\n"
        "Gauge('held', 'h', multiprocess_mode='livesum').set(3)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True, timeout=60)
    (tmp_path / "counter_999999.db").touch()  # created, not yet sized
    (tmp_path / "gauge_livesum_999999.db").touch()
    scraped = samples(merged_registry(str(tmp_path)))
    assert scraped[("served_total", frozenset())] == 7
    assert ("held", frozenset()) not in scraped  # its process is gone: its live gauge with it


def test_a_live_gauge_of_a_process_gone_is_dropped_by_the_next_scrape(tmp_path: Path) -> None:
    """A process killed outright calls nothing: under ``rdv gateway`` (uvicorn's own workers,
    no supervisor of ours) its ``rdv_in_flight_requests`` stayed summed for good (found by
    hand). Its counters stay, so totals never fall."""
    writer = (
        "import sys\n"
        "from prometheus_client import Counter, Gauge\n"
        "Counter('served', 's').inc(7)\n"
        "Gauge('held', 'h', multiprocess_mode='livesum').set(3)\n"
        "print('set', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with subprocess.Popen([sys.executable, "-c", writer], env=env, text=True,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:  # fmt: skip
        try:
            assert child.stdout is not None and child.stdout.readline() == "set\n"
            scraped = samples(merged_registry(str(tmp_path)))
            assert scraped[("held", frozenset())] == 3  # alive: counted
        finally:
            child.kill()
            child.wait(timeout=30)
    scraped = samples(merged_registry(str(tmp_path)))
    assert ("held", frozenset()) not in scraped
    assert scraped[("served_total", frozenset())] == 7
    assert not list(tmp_path.glob("gauge_live*"))


def test_a_scrape_leaves_out_the_series_of_deployments_gone(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A deleted and purged deployment's series stayed in every scrape for as long as the
    gateway ran (in multi-process mode its values stay in the files), so creating and deleting
    deployments grew ``/metrics`` without bound. Both modes: the process's own registry, and
    the files of another process summed."""
    metrics = GatewayMetrics()
    for dep in ("kept", "gone", None):
        metrics.request_done(dep, "real", 0.001)
    own = samples(metrics.scrape_registry({"kept"}))
    deployments = {dict(labels).get("deployment") for _, labels in own}
    assert deployments == {"kept", "_unknown", None}  # None: series without the label
    assert own[("rdv_in_flight_requests", frozenset())] == 0
    everything = samples(metrics.scrape_registry())
    assert {dict(labels).get("deployment") for _, labels in everything} >= {"gone"}

    writer = (
        "from prometheus_client import Counter\n"
        "c = Counter('rdv_requests', 'r', ['deployment', 'outcome'])\n"
        "c.labels('kept', 'real').inc(2)\n"
        "c.labels('gone', 'real').inc(5)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True, timeout=60)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    shared = samples(GatewayMetrics().scrape_registry({"kept"}))
    kept = ("rdv_requests_total", frozenset({"deployment": "kept", "outcome": "real"}.items()))
    assert shared[kept] == 2
    assert not [labels for _, labels in shared if dict(labels).get("deployment") == "gone"]


def test_a_lone_gateway_process_exposes_no_created_series() -> None:
    """A lone process exposed ``rdv_requests_created`` and three more, where the merged
    processes of ``rdv serve`` do not (a README walkthrough)."""
    from gateway.observability.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.request_done("d", "real", 0.01)
    metrics.flush()
    text = generate_latest(metrics.registry).decode()
    assert 'rdv_requests_total{deployment="d",outcome="real"} 1.0' in text
    assert "_created" not in text
