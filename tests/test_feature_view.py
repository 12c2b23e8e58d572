"""Per-request out-of-distribution evidence and the dashboard's feature view, on a running
gateway with real workers and its drift monitor: every decision record carries the OOD score
of its input, the drift report counts the same figures, the feature route serves a feature's
live window against training, and the page draws it in headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy.spatial.distance import mahalanobis
from test_dashboard import chromium, dump_dom

from gateway.observability.drift_monitor import IDLE_INTERVAL_S
from models.registry import ModelRegistry
from models.train import DEMO_DEPLOYMENT, DEMO_MODEL, REAL_VERSION, demo_data
from processes import PREDICT, System, launch_system, wait_until
from rendezvous import names
from rendezvous.decision import DecisionRecord, decode_entries
from rendezvous.schedule import Schedule

pytestmark = pytest.mark.integration

DRIFT = f"/v1/deployments/{DEMO_DEPLOYMENT}/drift"
FEATURES = f"{DRIFT}/features"
SCALED = "mean area"
NORMAL, FAULTY = 200, 80


@pytest.fixture(scope="module")
def system(
    redis_url: str, demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[System]:
    # A generous timeout: these tests need every request answered, and a shared CI host
    # can stall both workers for longer than a tight one.
    schedule = Schedule(real_deadline_ms=50, timeout_ms=5000, fallbacks=("canary",), grace_ms=100)
    env = {"RDV_DRIFT_INTERVAL_S": "0.5", "RDV_DRIFT_MIN_REQUESTS": "50"}
    with launch_system(redis_url, demo_data_dir, tmp_path_factory, schedule, **env) as sys:
        sys.start_worker("real")
        sys.start_worker("canary")
        yield sys


def test_before_any_traffic_the_view_shows_training_and_waits(
    system: System, tmp_path: Path
) -> None:
    """No window judged yet: the route answers with the training side alone, and the page
    draws the training deciles and says it waits; a stale ``?feature=`` link falls back to
    the default feature instead of failing."""
    chromium()
    view = system.http.get(FEATURES).json()
    names_ = list(demo_data().names)
    assert view["feature"] == names_[0] and view["live"] is None and view["history"] == []
    assert len(view["training"]["shares"]) == 10
    assert all(f["psi"] is None for f in view["features"])
    text = dump_dom(f"{system.http.base_url}/dashboard/{DEMO_DEPLOYMENT}?feature=nope",
                    tmp_path / "profile")  # fmt: skip
    dom = FeatureDom(text)
    assert dom.status == "ok" and dom.options == names_
    dist, ood = dom.charts["distribution"], dom.charts["ood"]
    assert dist["series"] == {"training": 10} and dist["points"] == 10
    assert "waiting for data: no live window judged yet" in dist["texts"]
    assert ood["points"] is None and "waiting for data: no out-of-distribution rate yet" in (
        ood["texts"])  # fmt: skip
    assert "no live window yet" in dom.facts


@pytest.fixture(scope="module")
def traffic(system: System) -> dict[str, np.ndarray]:
    """Held-out rows, then the same rows with one feature in other units (x10); returns the
    input of each request by id."""
    data = demo_data()
    rng = np.random.default_rng(1)
    sent: dict[str, np.ndarray] = {}
    area = data.names.index(SCALED)
    for i in range(NORMAL + FAULTY):
        row = data.x_test[rng.integers(0, len(data.x_test))].copy()
        if i >= NORMAL:
            row[area] *= 10
        rid = f"ood-{i}"
        resp = system.http.post(PREDICT, json={"instances": [row.tolist()]},
                                headers={"X-Request-Id": rid})  # fmt: skip
        assert resp.status_code == 200, resp.text
        sent[rid] = row[None, :]
    batch = data.x_test[:2].copy()
    batch[1, area] *= 10
    resp = system.http.post(PREDICT, json={"instances": batch.tolist()},
                            headers={"X-Request-Id": "ood-batch"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    sent["ood-batch"] = batch
    return sent


def test_each_decision_record_carries_the_ood_score_of_its_input(
    system: System, traffic: dict[str, np.ndarray], demo_data_dir: Path
) -> None:
    def recorded() -> dict[str, DecisionRecord] | None:
        entries = system.r.xrange(names.decisions_stream(DEMO_DEPLOYMENT))
        found = {d.request_id: d for d in decode_entries(entries)}
        return found if set(traffic) <= set(found) else None

    records = wait_until(recorded, 15, "decision records of every request")
    spec = ModelRegistry(demo_data_dir / "models").meta(DEMO_MODEL, REAL_VERSION).feature_spec
    assert spec.centre is not None
    k = spec.width
    w = np.zeros((k, k))
    for i, row in enumerate(spec.centre.whitening):
        w[i, : i + 1] = row
    mean = np.array([spec.stats[n].mean for n in spec.names])
    std = np.array([spec.stats[n].std for n in spec.names])
    lo = np.array([spec.stats[n].min for n in spec.names])
    hi = np.array([spec.stats[n].max for n in spec.names])
    training_max = spec.centre.distance_quantiles["1.0"]
    for rid, x in traffic.items():
        ood = records[rid].ood
        assert ood is not None and ood.method == "mahalanobis" and ood.rows == len(x), rid
        for r, row in enumerate(x.astype(np.float64)):
            want = mahalanobis((row - mean) / std, np.zeros(k), w.T @ w) / np.sqrt(k)
            assert ood.distance[r] == pytest.approx(want, abs=2e-4), rid
            outside = [n for n, v, a, b in zip(spec.names, row, lo, hi, strict=True)
                       if v < a or v > b]  # fmt: skip
            assert ood.outside[r] == outside, rid
            assert ood.out_of_range[r] == pytest.approx(len(outside) / k, abs=1e-4)
    # A unit change pushes most rows past the training range (small areas x10 stay inside),
    # and every one of them far from the training centre: area no longer fits its radius.
    faulty = [records[f"ood-{i}"].ood for i in range(NORMAL, NORMAL + FAULTY)]
    assert sum(1 for o in faulty if o and SCALED in o.outside[0]) > 0.7 * FAULTY
    assert all(o is not None and o.distance[0] > training_max for o in faulty)
    normal = [records[f"ood-{i}"].ood for i in range(NORMAL)]
    assert np.median([o.distance[0] for o in normal if o]) < spec.centre.distance_quantiles["0.9"]
    assert sum(1 for o in normal if o and o.distance[0] > training_max) < 0.05 * NORMAL
    batch = records["ood-batch"].ood
    assert batch is not None and SCALED not in batch.outside[0] and SCALED in batch.outside[1]


def _judged(system: System) -> dict[str, Any] | None:
    doc: dict[str, Any] = system.http.get(DRIFT).json()
    cur = doc["current"]
    if not cur or cur["requests"] < NORMAL + FAULTY + 1 or len(doc["history"]) < 2:
        return None
    view = system.http.get(FEATURES, params={"feature": SCALED}).json()
    return doc if view.get("live") and len(view["history"]) >= 2 else None


def _wait_judged(system: System) -> dict[str, Any]:
    """``_judged``'s document; on a time-out, what the monitor left: who holds the evaluation
    lease, the stored report's time and count, the history's length and the gateway's log.
    A 30 s wait timed out twice in CI, never alone (cause not found): the wait now covers the
    monitor's idle interval too (60 s), after which an evaluation and a point always come."""
    try:
        doc: dict[str, Any] = wait_until(lambda: _judged(system), IDLE_INTERVAL_S + 15,
                                         "a judged window with history", 0.2)  # fmt: skip
        return doc
    except AssertionError as exc:
        report = system.r.get(names.drift_report_key(DEMO_DEPLOYMENT))
        figures = {
            "lease": system.r.get(names.drift_lock_key(DEMO_DEPLOYMENT)),
            "report": (report or b"")[:300],
            "history": system.r.xlen(names.drift_history_stream(DEMO_DEPLOYMENT)),
            "sketches": system.r.xlen(names.drift_sketch_stream(DEMO_DEPLOYMENT)),
            "gateway log": system.procs["gateway"].log_text()[-3000:],
        }
        raise AssertionError(f"{exc}: {figures}") from None


def test_the_report_and_the_feature_route_count_the_same_evidence(
    system: System, traffic: dict[str, np.ndarray]
) -> None:
    doc = _wait_judged(system)
    ood = doc["current"]["ood"]
    assert ood["distance_method"] == "mahalanobis"
    assert set(ood["training_distance"]) == {"p50", "p90", "p99", "p100"}
    assert ood["distance"]["p99"] > ood["training_distance"]["p100"]  # the faulty rows
    assert ood["features"][0]["feature"] == SCALED
    rows = NORMAL + FAULTY + 2
    assert ood["rate"] > 0.7 * FAULTY / rows
    assert doc["history"][-1]["ood_rate"] is not None

    metrics = {
        (m.name, s.labels.get("quantile")): s.value
        for m in text_string_to_metric_families(system.http.get("/metrics").text)
        for s in m.samples
        if m.name.startswith("rdv_drift_ood") and s.labels.get("deployment") == DEMO_DEPLOYMENT
    }
    now = system.http.get(DRIFT).json()["current"]["ood"]  # the report the scrape read
    assert metrics[("rdv_drift_ood_ratio", None)] == pytest.approx(now["rate"])
    for key, quantile in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):
        assert metrics[("rdv_drift_ood_distance_quantile", quantile)] == now["distance"][key]

    view = system.http.get(FEATURES, params={"feature": SCALED}).json()
    assert view["deployment"] == DEMO_DEPLOYMENT and view["feature"] == SCALED
    live, training = view["live"], view["training"]
    assert live["rows"] == rows and sum(live["counts"]) == rows
    area = np.concatenate(list(traffic.values()))[:, demo_data().names.index(SCALED)]
    stats = training["stats"]
    outside = int(((area < stats["min"]) | (area > stats["max"])).sum())
    assert outside > 0.7 * FAULTY and live["out_of_range_rows"] == outside
    assert live["out_of_range_rate"] == pytest.approx(outside / rows, abs=1e-6)
    assert len(training["edges"]) == len(training["shares"]) + 1 == 11
    assert training["stats"]["max"] == training["edges"][-1]
    latest = view["history"][-1]
    assert latest["out_of_range_rate"] == live["out_of_range_rate"]
    assert latest["ood_rate"] == pytest.approx(ood["rate"], abs=1e-6)
    assert latest["psi"] == doc["current"]["features"]["psi"][SCALED]
    assert [f["feature"] for f in view["features"]] == list(demo_data().names)
    default = system.http.get(FEATURES).json()  # no pick: the feature drifting most
    assert default["feature"] == doc["current"]["features"]["top"][0]["feature"]

    unknown = system.http.get(FEATURES, params={"feature": "nope"})
    assert unknown.status_code == 404 and "'nope' is not in" in unknown.json()["detail"]
    gone = system.http.get("/v1/deployments/nope/drift/features")
    assert gone.status_code == 404 and "'nope' does not exist" in gone.json()["detail"]
    bad = system.http.get("/v1/deployments/NOT%20valid/drift/features")
    assert bad.status_code == 422 and "invalid deployment" in bad.json()["detail"]


class FeatureDom(HTMLParser):
    """The feature section as a reader sees it: its status, the picked feature and options,
    and per chart the points and the series drawn."""

    def __init__(self, text: str):
        super().__init__()
        self.status = ""
        self.options: list[str] = []
        self.selected: str | None = None
        self.charts: dict[str, dict[str, Any]] = {}
        self.facts = ""
        self._chart: dict[str, Any] | None = None
        self._option: str | None = None
        self._facts = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id") == "feature-view":
            self.status = a.get("data-status") or ""
        elif tag == "option":
            self._option = a.get("value") or ""
            self.options.append(self._option)
            if "selected" in a:
                self.selected = self._option
        elif a.get("id") == "feature-facts":
            self._facts = True
        elif tag == "svg" and a.get("data-feature-chart"):
            points = a.get("data-points")
            self._chart = self.charts[a["data-feature-chart"] or ""] = {
                "points": int(points) if points else None, "series": {}, "texts": []}  # fmt: skip
        elif self._chart is not None and a.get("data-series"):
            series = self._chart["series"]
            series[a["data-series"]] = series.get(a["data-series"], 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        elif tag == "p":
            self._facts = False

    def handle_data(self, data: str) -> None:
        if self._chart is not None and data.strip():
            self._chart["texts"].append(data.strip())
        if self._facts:
            self.facts += data


def test_the_feature_view_renders_with_data_in_chromium(
    system: System, traffic: dict[str, np.ndarray], tmp_path: Path
) -> None:
    chromium()
    _wait_judged(system)
    url = f"{system.http.base_url}/dashboard/{DEMO_DEPLOYMENT}?feature=mean%20area"
    text = dump_dom(url, tmp_path / "profile")
    dom = FeatureDom(text)
    assert dom.status == "ok", text[-3000:]
    assert dom.options == list(demo_data().names)
    assert f'<option value="{SCALED}">{SCALED} · PSI' in text
    dist, ood = dom.charts["distribution"], dom.charts["ood"]
    # Ten training deciles, ten live bins, and the live rows outside the training range.
    assert dist["series"] == {"training": 10, "live": 10, "outside": 1}, dist
    assert dist["points"] == 21 and "outside" in dist["texts"]
    # found by hand: the end deciles hold the rows outside the range too (open, as PSI reads
    # them), and their tooltips said "values <training min>-<first decile>"
    ends = [t for t in dist["texts"] if "training minimum too" in t or "maximum too" in t]
    assert len(ends) == 4, dist["texts"]  # training and live, first and last decile
    assert ood["points"] and ood["points"] >= 4 and set(ood["series"]) >= {
        "out_of_range_rate", "ood_rate"}  # fmt: skip
    assert "outside the training range" in dom.facts and "rows" in dom.facts
    assert not any("waiting for data" in t for t in dist["texts"] + ood["texts"])
    # The select shows the pick: the script sets its value (a property, not an attribute),
    # so the picked feature's data is what the facts line and the bars describe.
    view = system.http.get(FEATURES, params={"feature": SCALED}).json()
    assert f"{view['live']['rows']} rows" in dom.facts
