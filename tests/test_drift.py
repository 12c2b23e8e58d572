"""Drift statistics: the pure measures, the sketch format, thresholds and alert transitions,
and the end-to-end check that the default thresholds stay quiet on stationary traffic and
fire on a real input shift of the demo models (onnxruntime, no Redis).

Longer than ~400 lines on purpose: the measures, the sketch and the alerts are checked on the
same simulated windows of demo traffic, built once here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from models.meta import ModelMeta
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from models.train import CANARY_VERSION, DEMO_MODEL, REAL_VERSION, demo_data
from rendezvous.divergence import divergence
from rendezvous.drift import (
    DIVERGENCE_EDGES,
    SCORE_EDGES,
    Sketch,
    divergence_counts,
    histogram_quantile,
    js_distance_counts,
    psi,
    score_counts,
)
from rendezvous.drift_alerts import ALERT_KINDS, Thresholds, evaluate_alerts, window_report
from rendezvous.drift_reference import FeatureReference, FeatureReferences
from rendezvous.spec import FeatureSpec, FeatureStats

# -- the measures ------------------------------------------------------------------------------


def test_psi_is_zero_for_identical_histograms_and_matches_a_hand_computed_value() -> None:
    assert psi(np.array([0.2, 0.3, 0.5]), np.array([20, 30, 50])) == pytest.approx(0, abs=1e-12)
    # a = (.5, .25, .25) against e = (.25, .25, .5): .25 ln 2 + 0 + (-.25) ln .5 = .5 ln 2
    value = psi(np.array([0.25, 0.25, 0.5]), np.array([50, 25, 25]))
    assert value == pytest.approx(0.5 * math.log(2), rel=1e-3)
    assert psi(np.array([1, 1, 2]), np.array([50, 25, 25])) == pytest.approx(value)  # counts
    empty_bin = psi(np.array([0.5, 0.5, 0.0]), np.array([0, 10, 10]))
    assert math.isfinite(empty_bin) and empty_bin > 1
    with pytest.raises(ValueError):
        psi(np.array([0.5, 0.5]), np.array([0, 0]))
    with pytest.raises(ValueError):
        psi(np.array([0.5, 0.5]), np.array([1, 2, 3]))


def test_js_distance_of_histograms() -> None:
    assert js_distance_counts(np.array([3, 1, 0]), np.array([0.75, 0.25, 0])) == pytest.approx(
        0, abs=1e-7
    )
    assert js_distance_counts(np.array([5, 0]), np.array([0, 7])) == pytest.approx(1.0)
    p, q = np.array([10, 5, 1, 0]), np.array([2, 2, 8, 4])
    assert js_distance_counts(p, q) == pytest.approx(jensenshannon(p, q, base=2))


def test_histogram_quantile_interpolates_inside_the_bin() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    assert histogram_quantile(edges, np.array([0, 10, 0]), 0.5) == pytest.approx(1.5)
    assert histogram_quantile(edges, np.array([10, 10, 0]), 0.5) == pytest.approx(1.0)
    assert histogram_quantile(edges, np.array([10, 10, 0]), 0.75) == pytest.approx(1.5)
    assert histogram_quantile(edges, np.array([0, 4, 4]), 0.0) == pytest.approx(1.0)
    assert histogram_quantile(edges, np.array([0, 4, 4]), 1.0) == pytest.approx(3.0)
    assert histogram_quantile(edges, np.array([0, 0, 0]), 0.5) is None
    # an open last bin (everything past its lower edge): a quantile in it is that edge, a floor
    assert histogram_quantile(edges, np.array([10, 0, 10]), 0.99, open_last=True) == 2.0
    assert histogram_quantile(edges, np.array([10, 0, 10]), 0.25, open_last=True) == 0.5


def test_fixed_bins_clip_into_range_and_drop_nan() -> None:
    assert len(SCORE_EDGES) == 11 and len(DIVERGENCE_EDGES) == 15
    counts = score_counts(np.array([0.0, 0.05, -0.1, 0.1, 0.95, 1.0, 1.2, np.nan]))
    assert counts.dtype == np.int64 and counts.tolist() == [3, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    proba = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    assert score_counts(proba).tolist() == score_counts(proba[:, 1]).tolist()
    div = divergence_counts([0.0, 0.001, 0.3, 1.0])
    assert div.shape == (14,) and div[0] == div[1] == div[10] == div[13] == 1


def test_sketch_bins_a_few_scores_like_the_vectorised_path() -> None:
    values = [0.0, 0.1, 0.2999999, 0.3, 0.55, 0.9, 1.0, 1.5, -0.5, float("nan"), float("inf")]
    small, large = Sketch(), Sketch()
    for i in range(0, len(values), 4):
        chunk = np.array(values[i : i + 4])
        small.add_decision(
            real_scores=chunk, canary_scores=None, js_mean=None, rows=4, disagreements=None
        )
    large.add_decision(
        real_scores=np.array(values * 2),
        canary_scores=None,
        js_mean=None,
        rows=22,
        disagreements=None,
    )
    assert small.score_real.tolist() == score_counts(np.array(values)).tolist()
    assert (2 * small.score_real).tolist() == large.score_real.tolist()
    for js in (0.0, 0.001, 0.0049, 0.2, 0.99, 1.0):
        one = Sketch()
        one.add_decision(
            real_scores=np.array([0.5]), canary_scores=None, js_mean=js, rows=1, disagreements=0
        )
        assert one.divergence.tolist() == divergence_counts([js]).tolist()


# -- feature bins ------------------------------------------------------------------------------


def _spec(quantiles: dict[str, list[float]], mins: dict[str, float]) -> FeatureSpec:
    levels = ["0.25", "0.5", "0.75"]
    return FeatureSpec(
        names=tuple(quantiles),
        stats={
            n: FeatureStats(0, 1, mins[n], 10, dict(zip(levels, qs, strict=True)))
            for n, qs in quantiles.items()
        },
    )


def test_feature_bins_match_a_brute_force_loop_with_ties_to_the_upper_bin() -> None:
    spec = _spec({"a": [1.0, 2.0, 3.0], "b": [0.0, 0.0, 5.0]}, {"a": -5.0, "b": 0.0})
    ref = FeatureReference.from_spec(spec)
    assert ref is not None and ref.cuts.shape == (2, 3)
    # b: the training minimum is the first cut and the second cut repeats it, so bins 0 and
    # 1 cannot hold a training row; their share goes where the tied zeros land (bin 2).
    assert ref.expected.tolist() == [[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.75, 0.25]]
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(1.5, 2.5, size=(400, 2)) * 2) / 2  # many exact cut values
    x[7, 1] = np.nan
    counts = ref.bin(x)
    expected = np.zeros((2, 4), np.int64)
    for row in x:
        if np.isnan(row).any():
            continue
        for f, value in enumerate(row):
            expected[f, sum(value >= c for c in ref.cuts[f])] += 1
    assert counts.dtype == np.int64 and counts.tolist() == expected.tolist()
    assert counts.sum() == 2 * 399
    assert ref.bin(np.array([2.0, 0.0])).tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]]
    with pytest.raises(ValueError):
        ref.bin(np.zeros((3, 5)))


def test_feature_reference_version_and_missing_quantiles() -> None:
    spec = _spec({"a": [1.0, 2.0, 3.0]}, {"a": 0.0})
    ref, same = FeatureReference.from_spec(spec), FeatureReference.from_spec(spec)
    other = FeatureReference.from_spec(_spec({"a": [1.0, 2.0, 4.0]}, {"a": 0.0}))
    assert ref is not None and same is not None and other is not None
    assert ref.version == same.version != other.version
    assert FeatureReference.from_spec(FeatureSpec.from_names(["a", "b"])) is None


def test_feature_references_let_go_of_deployments_gone() -> None:
    """A process kept each deployment's spec and reference it ever built (tens of kB) for as
    long as it ran, deleted ones included (a churn probe)."""
    spec = _spec({"a": [1.0, 2.0, 3.0]}, {"a": 0.0})
    held = FeatureReferences()
    kept, gone = held.of("kept", spec), held.of("gone", spec)
    assert kept is not None and gone is not None
    assert held.of("gone", spec) is gone  # built once while the spec stays
    held.keep_only({"kept"})
    assert held.of("kept", spec) is kept
    assert held.of("gone", spec) is not gone  # forgotten: built afresh


def test_training_rows_have_no_feature_drift_against_their_own_quantiles(
    demo_registry: ModelRegistry,
) -> None:
    """Also covers the concavity features, whose zeros tie with the first cut."""
    ref = FeatureReference.from_spec(demo_registry.meta(DEMO_MODEL, REAL_VERSION).feature_spec)
    assert ref is not None
    counts = ref.bin(demo_data().x_train)
    worst = max(psi(ref.expected[i], counts[i]) for i in range(len(ref.names)))
    assert worst < 0.01


def test_features_of_few_distinct_values_have_no_drift_against_their_own_training() -> None:
    """Pixel intensities, counts, one-decimal measurements: tied values put anything but a
    tenth of the rows in each decile bin, and read against a tenth each, a model's own
    reference rows had a PSI of 0.5 to 0.95 (a helper's probe: false feature_psi alerts on
    the digits data). The bins' counted shares go with the statistics."""
    from models.reference import training_spec

    rng = np.random.default_rng(7)
    x = np.column_stack([
        np.where(rng.random(4000) < 0.6, 0, rng.integers(1, 17, 4000)),  # mostly-zero pixels
        rng.poisson(2.0, 4000),  # counts
        np.round(rng.normal(5.0, 0.4, 4000), 1),  # one decimal
        rng.normal(0.0, 1.0, 4000),  # continuous: as before
    ]).astype(np.float64)  # fmt: skip
    ref = FeatureReference.from_spec(training_spec(["px", "count", "dec", "z"], x))
    assert ref is not None
    seen = x.astype(np.float32)  # as the gateway bins them: 5.3 is 5.2999997 there
    worst = max(psi(ref.expected[i], ref.bin(seen)[i]) for i in range(4))
    assert worst < 0.001
    fresh = np.column_stack([
        np.where(rng.random(2000) < 0.6, 0, rng.integers(1, 17, 2000)),
        rng.poisson(2.0, 2000),
        np.round(rng.normal(5.0, 0.4, 2000), 1),
        rng.normal(0.0, 1.0, 2000),
    ]).astype(np.float64)  # fmt: skip
    fresh32 = fresh.astype(np.float32)
    assert max(psi(ref.expected[i], ref.bin(fresh32)[i]) for i in range(4)) < 0.05


# -- sketches ----------------------------------------------------------------------------------


def _sketch(start_ms: float, n: int) -> Sketch:
    s = Sketch(real_model="m:2", canary_model="m:1", start_ms=start_ms, end_ms=start_ms + 1000)
    for i in range(n):
        s.add_decision(
            real_scores=np.array([0.05, 0.95]),
            canary_scores=np.array([0.15, 0.9]),
            js_mean=0.02 * i,
            rows=2,
            disagreements=i % 2,
        )
    s.add_features(np.arange(8).reshape(2, 4), rows=n, version="fr-x")
    return s


def test_sketches_merge_by_adding() -> None:
    a, b = _sketch(1000, 3), _sketch(5000, 2)
    m = Sketch().merge(a).merge(b)
    assert (m.start_ms, m.end_ms) == (1000, 6000)
    assert (m.requests, m.rows, m.compared, m.compared_rows, m.disagreements) == (5, 10, 5, 10, 2)
    assert m.score_real.tolist() == [5, 0, 0, 0, 0, 0, 0, 0, 0, 5]
    assert m.score_canary[1] == 5 and m.divergence.sum() == 5
    assert m.divergence_sum == pytest.approx(0.02 * (0 + 1 + 2) + 0.02 * (0 + 1))
    assert (
        m.features is not None and m.features.tolist() == (2 * np.arange(8)).reshape(2, 4).tolist()
    )
    assert (m.feature_rows, m.feature_version, m.real_model) == (5, "fr-x", "m:2")
    assert a.requests == 3  # the inputs are untouched
    one_sided = a.merge(Sketch(requests=1))
    assert one_sided.features is not None and one_sided.features is not a.features
    assert a.features is not None and np.array_equal(one_sided.features, a.features)
    assert one_sided.requests == 4
    assert Sketch().empty() and not m.empty()


def test_sketches_of_different_models_or_feature_bins_do_not_merge() -> None:
    a = _sketch(0, 1)
    b = _sketch(0, 1)
    b.features = np.zeros((3, 4), np.int64)
    with pytest.raises(ValueError, match="shape"):
        a.merge(b)
    with pytest.raises(ValueError, match="real_model"):
        a.merge(Sketch(real_model="m:3"))
    with pytest.raises(ValueError, match="feature_version"):
        a.merge(Sketch(feature_version="fr-other"))
    with pytest.raises(ValueError):
        a.add_features(np.zeros((2, 4)), 1, version="fr-other")


def test_sketch_bytes_roundtrip_and_garbage() -> None:
    s = _sketch(1000, 4)
    raw = s.to_bytes()
    back = Sketch.from_bytes(raw)
    for name in ("real_model", "feature_version", "start_ms", "requests", "divergence_sum"):
        assert getattr(back, name) == getattr(s, name)
    for name in ("score_real", "score_canary", "divergence", "features"):
        assert np.array_equal(getattr(back, name), getattr(s, name))
    assert Sketch.from_bytes(Sketch().to_bytes()).features is None
    assert len(raw) < 400
    doc = msgpack.unpackb(raw)
    doc["score_real"] = [[3], doc["score_real"][1][:3]]
    floats = {**doc, "divergence": [[14], [0.5] * 14]}
    garbage = [b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"v": 2})]
    for raw_doc in (*garbage, msgpack.packb(doc), msgpack.packb(floats)):
        with pytest.raises(ValueError):
            Sketch.from_bytes(raw_doc)


def test_out_of_distribution_evidence_is_counted_merged_and_reported() -> None:
    """Per row: outside the training range (per feature and any), and the distance to the
    training centre; summed over sketches and reported as the window's OOD rate and
    distance quantiles. A sketch written before these fields still reads."""
    spec = _spec({"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0]}, {"a": 0.0, "b": 0.0})
    ref = FeatureReference.from_spec(spec)
    assert ref is not None and ref.ood is not None
    rows = np.array([[2.0, 5.0], [12.0, 5.0], [-5.0, 99.0], [np.nan, 1.0]])  # range 0 to 10
    ood_rows, per_feature, distance = ref.evidence(rows)
    assert ood_rows == 2 and per_feature.tolist() == [2, 1] and distance.sum() == 3
    a, b = _sketch(0, 2), _sketch(0, 2)
    a.features = b.features = None
    a.feature_version = b.feature_version = None
    a.feature_rows = b.feature_rows = 0
    for s in (a, b):
        s.add_features(ref.bin(rows), rows=3, version=ref.version)
        s.add_evidence(ood_rows, per_feature, distance)
    m = Sketch.from_bytes(a.merge(b).to_bytes())
    assert m.ood_rows == 4 and m.out_of_range is not None and m.out_of_range.tolist() == [4, 2]
    assert m.distance.sum() == 6
    report = window_report(m, score_reference=None, reference_source=None, features=ref,
                           thresholds=Thresholds(min_requests=1))  # fmt: skip
    ood = report["ood"]
    assert ood["rows"] == 6 and ood["rate"] == pytest.approx(4 / 6)
    assert ood["features"][0] == {"feature": "a", "rate": pytest.approx(4 / 6)}
    assert ood["distance"]["p50"] is not None and ood["distance"]["p50"] <= ood["distance"]["p99"]
    old = msgpack.unpackb(_sketch(0, 1).to_bytes())
    for name in ("ood_rows", "out_of_range", "distance"):
        del old[name]
    before = Sketch.from_bytes(msgpack.packb(old))
    assert before.ood_rows == 0 and before.distance.sum() == 0 and before.out_of_range is None
    assert window_report(before, score_reference=None, reference_source=None, features=None,
                         thresholds=Thresholds())["ood"] is None  # fmt: skip


# -- thresholds and alerts ---------------------------------------------------------------------


def test_thresholds_validate_and_name_the_key() -> None:
    t = Thresholds.from_dict({"score_psi": 0.3, "min_requests": 50})
    assert t.score_psi == 0.3 and t.min_requests == 50 and t.feature_psi == Thresholds().feature_psi
    assert Thresholds.from_dict(t.to_dict()) == t
    assert t.merged({"feature_psi": 2}).feature_psi == 2.0  # an int is a float here
    bad: list[tuple[dict[str, Any], str]] = [
        ({"scor_psi": 0.1}, "scor_psi"),
        ({"score_psi": "high"}, "score_psi"),
        ({"score_js": -0.1}, "score_js"),
        ({"feature_psi": float("nan")}, "feature_psi"),
        ({"disagreement_rate": True}, "disagreement_rate"),
        ({"min_requests": 2.5}, "min_requests"),
        # figures in [0, 1]: a threshold of 1 or more switched the alert off unsaid
        ({"disagreement_rate": 1.5}, "disagreement_rate' must be below 1"),
        ({"score_js": 1}, "score_js' must be below 1"),
        ({"divergence_mean": 1.0}, "divergence_mean' must be below 1"),
        ({"score_psi": 10**400}, "score_psi' must be finite"),  # float() overflowed: a 500
        ({"min_requests": 10**400}, "min_requests' must be finite"),
    ]
    for doc, key in bad:
        with pytest.raises(ValueError, match=key):
            t.merged(doc)


def _report(status: str = "ok", **values: float | None) -> dict[str, object]:
    return {"status": status, "requests": 200, "values": {k: values.get(k) for k in ALERT_KINDS}}


def test_alerts_raise_stay_and_clear() -> None:
    t = Thresholds()
    active, events = evaluate_alerts(_report(score_psi=0.5, score_js=0.01), t, {}, 1000)
    assert list(active) == ["score_psi"] and active["score_psi"]["since_ms"] == 1000
    said = "PSI of real's scores from the reference 0.5 > 0.3 over 200 requests"
    assert events == [
        {
            "type": "raised",
            "kind": "score_psi",
            "value": 0.5,
            "threshold": 0.3,
            "ts_ms": 1000,
            "detail": said,
        }
    ]
    assert active["score_psi"]["detail"] == said
    assert (
        active["score_psi"]["statistic"]
        == "PSI of real's scores from the reference over the last 200 requests"
    )
    active, events = evaluate_alerts(_report(score_psi=0.7), t, active, 2000)
    assert events == [] and active["score_psi"]["since_ms"] == 1000
    assert active["score_psi"]["value"] == 0.7
    for report in (_report("insufficient_data", score_psi=0.0), _report(score_psi=None)):
        assert evaluate_alerts(report, t, active, 3000) == (active, [])
    active, events = evaluate_alerts(_report(score_psi=t.score_psi), t, active, 4000)
    assert active == {} and [e["type"] for e in events] == ["cleared"]
    assert events[0]["ts_ms"] == 4000


def test_report_shape_and_insufficient_data() -> None:
    s = _sketch(0, 3)
    report = window_report(
        s, score_reference=None, reference_source=None, features=None, thresholds=Thresholds()
    )
    json.dumps(report)
    assert report["status"] == "insufficient_data" and report["requests"] == 3
    assert set(report) == {
        *("status", "requests", "rows", "from_ms", "to_ms", "real_model", "canary_model"),
        *("divergence", "score", "features", "values", "ood", "classes"),
    }
    assert report["classes"] is None  # a binary model's window counts no classes
    assert report["divergence"]["mean"] == pytest.approx(0.02)
    assert report["divergence"]["disagreement_rate"] == pytest.approx(1 / 6, rel=1e-5)
    assert report["score"]["psi"] is None and report["score"]["reference"] is None
    assert report["features"] == {"psi": {}, "top": [], "max_psi": None}
    assert set(report["values"]) == set(ALERT_KINDS)
    empty = window_report(
        Sketch(),
        score_reference=None,
        reference_source=None,
        features=None,
        thresholds=Thresholds(),
    )
    assert empty["divergence"]["mean"] is None and empty["divergence"]["p50"] is None


# -- drift on the demo models ------------------------------------------------------------------

SIZE_FEATURES = ("mean radius", "mean perimeter", "worst radius", "worst perimeter")
AREA_FEATURES = ("mean area", "worst area")
SCALE = 1.3
SEEDS = range(5)
WINDOWS = (Thresholds().min_requests, 600)
"""The smallest window the monitor evaluates, and a comfortable one."""


@dataclass
class Demo:
    real: OnnxClassifier
    canary: OnnxClassifier
    meta: ModelMeta
    features: FeatureReference


@pytest.fixture(scope="module")
def demo(demo_data_dir: Path) -> Demo:
    registry = ModelRegistry(demo_data_dir / "models")
    meta = registry.meta(DEMO_MODEL, REAL_VERSION)
    features = FeatureReference.from_spec(meta.feature_spec)
    assert features is not None
    return Demo(
        real=OnnxClassifier(registry.artifact_path(DEMO_MODEL, REAL_VERSION), meta),
        canary=OnnxClassifier(
            registry.artifact_path(DEMO_MODEL, CANARY_VERSION),
            registry.meta(DEMO_MODEL, CANARY_VERSION),
        ),
        meta=meta,
        features=features,
    )


def traffic(seed: int, shifted: bool, rows: int) -> np.ndarray:
    """Rows drawn with replacement from the held-out split. The shift is a change of image
    scale by 30 %: lengths x1.3, areas x1.69 (a recalibrated scanner)."""
    data = demo_data()
    x = data.x_test[np.random.default_rng(seed).integers(0, len(data.x_test), rows)].copy()
    if shifted:
        for name in SIZE_FEATURES:
            x[:, data.names.index(name)] *= SCALE
        for name in AREA_FEATURES:
            x[:, data.names.index(name)] *= SCALE**2
    return x


def window_of(demo: Demo, rows: np.ndarray) -> Sketch:
    """What the gateway would do: one single-row request per row, features binned per
    second, a sketch per second sent as bytes, the monitor merging them."""
    real_labels, real_proba = demo.real.predict(rows)
    canary_labels, canary_proba = demo.canary.predict(rows)
    window = Sketch()
    for second, start in enumerate(range(0, len(rows), 100)):
        sketch = Sketch(
            real_model=f"{DEMO_MODEL}:{REAL_VERSION}",
            canary_model=f"{DEMO_MODEL}:{CANARY_VERSION}",
            start_ms=second * 1000.0,
            end_ms=second * 1000.0 + 999,
        )
        batch = slice(start, start + 100)
        sketch.add_features(
            demo.features.bin(rows[batch]), len(rows[batch]), version=demo.features.version
        )
        for i in range(start, min(start + 100, len(rows))):
            one = slice(i, i + 1)
            div = divergence(
                real_labels[one].tolist(),
                real_proba[one],
                canary_labels[one].tolist(),
                canary_proba[one],
            )
            sketch.add_decision(
                real_scores=real_proba[one, 1],
                canary_scores=canary_proba[one, 1],
                js_mean=div.js_mean,
                rows=1,
                disagreements=div.disagreements,
            )
        window = window.merge(Sketch.from_bytes(sketch.to_bytes()))
    return window


def drift_report(demo: Demo, rows: np.ndarray) -> dict[str, Any]:
    return window_report(
        window_of(demo, rows),
        score_reference=np.asarray(demo.meta.score_reference),
        reference_source="training-oof",
        features=demo.features,
        thresholds=Thresholds(),
    )


def _show(label: str, seed: int, report: dict[str, Any]) -> None:
    values = report["values"]
    assert isinstance(values, dict)
    top = [t["feature"] for t in report["features"]["top"]]
    figures = " ".join(f"{k}={v:.3f}" for k, v in values.items() if v is not None)
    print(f"\n{label} {report['requests']} requests, seed {seed}: {figures} top={top}")


@pytest.mark.parametrize("rows", WINDOWS)
def test_stationary_traffic_raises_no_alert(demo: Demo, rows: int) -> None:
    for seed in SEEDS:
        report = drift_report(demo, traffic(seed, shifted=False, rows=rows))
        _show("stationary", seed, report)
        assert report["status"] == "ok" and report["requests"] == rows
        assert evaluate_alerts(report, Thresholds(), {}, 0.0) == ({}, [])


@pytest.mark.parametrize("rows", WINDOWS)
def test_shifted_inputs_raise_score_and_feature_alerts_naming_the_shifted_features(
    demo: Demo, rows: int
) -> None:
    shifted = {*SIZE_FEATURES, *AREA_FEATURES}
    t = Thresholds()
    for seed in SEEDS:
        report = drift_report(demo, traffic(seed, shifted=True, rows=rows))
        _show("shifted", seed, report)
        active, events = evaluate_alerts(report, t, {}, 0.0)
        assert {"score_psi", "feature_psi"} <= set(active)
        assert {e["kind"] for e in events} == set(active)
        feature_psi = report["features"]["psi"]
        assert {n for n, v in feature_psi.items() if v > t.feature_psi} == shifted
        assert {e["feature"] for e in report["features"]["top"]} <= shifted
        top = report["features"]["top"][0]["feature"]
        assert f"over {rows} requests ({top} " in active["feature_psi"]["detail"]


# -- the demo metadata -------------------------------------------------------------------------


def test_demo_models_carry_a_score_reference(demo_registry: ModelRegistry) -> None:
    for version in (CANARY_VERSION, REAL_VERSION):
        ref = demo_registry.meta(DEMO_MODEL, version).score_reference
        assert ref is not None and len(ref) == len(SCORE_EDGES) - 1
        assert min(ref) >= 0 and sum(ref) == pytest.approx(1.0)
    old = demo_registry.meta(DEMO_MODEL, REAL_VERSION).to_dict()
    del old["score_reference"]
    assert ModelMeta.from_dict(old).score_reference is None
