"""The out-of-distribution score of each input (``rendezvous.ood``), its training statistics
(``models.train.training_centre``), its place in the decision record, and the feature view's
shaping (``gateway.observability.drift_features``). Pure: no Redis."""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis

from gateway.observability import drift_features
from models.train import demo_data, training_spec, training_stats
from rendezvous.decision import FIELD, DecisionFormatError, DecisionRecord, build_decision
from rendezvous.drift import Sketch
from rendezvous.drift_reference import FeatureReference
from rendezvous.envelope import ModelResult
from rendezvous.ood import OodReference, OodScore
from rendezvous.spec import FeatureSpec, FeatureStats, TrainingCentre

pytestmark = pytest.mark.pure


def _stats(mean: float, std: float, lo: float, hi: float) -> FeatureStats:
    return FeatureStats(mean=mean, std=std, min=lo, max=hi, quantiles={"0.5": mean})


def test_without_a_centre_the_distance_is_the_root_mean_square_of_the_z_scores() -> None:
    spec = FeatureSpec(("a", "b"), {"a": _stats(0, 1, -3, 3), "b": _stats(10, 2, 4, 16)})
    ref = OodReference.from_spec(spec)
    assert ref is not None and ref.method == "diagonal" and ref.training_distance == {}
    score = ref.score(np.array([[0.0, 10.0], [3.0, 14.0], [-4.0, 20.0]], dtype=np.float32))
    assert score.distance == [0.0, pytest.approx(np.sqrt((9 + 4) / 2), abs=1e-4),
                              pytest.approx(np.sqrt((16 + 25) / 2), abs=1e-4)]  # fmt: skip
    assert score.out_of_range == [0.0, 0.0, 1.0]  # 3 and 14 lie on or inside the range
    assert score.outside == [[], [], ["a", "b"]] and score.rows == 3
    assert OodReference.from_spec(FeatureSpec(("a", "b"), {"a": _stats(0, 1, -3, 3)})) is None


def test_with_a_centre_the_distance_is_mahalanobis_over_the_shrunk_correlation() -> None:
    """Checked against scipy's Mahalanobis distance with the inverse correlation the
    whitening stands for, on z-scores, over sqrt(features)."""
    data = demo_data()
    spec = training_spec(data.names, data.x_train)
    ref = OodReference.from_spec(spec)
    assert ref is not None and ref.method == "mahalanobis" and spec.centre is not None
    k = spec.width
    w = np.zeros((k, k))
    for i, row in enumerate(spec.centre.whitening):
        w[i, : i + 1] = row
    inverse = w.T @ w
    mean = np.array([spec.stats[n].mean for n in spec.names])
    std = np.array([spec.stats[n].std for n in spec.names])
    rows = data.x_test[:20]
    score = ref.score(rows)
    for row, got in zip(rows, score.distance, strict=True):
        z = (row.astype(np.float64) - mean) / std
        want = mahalanobis(z, np.zeros(k), inverse) / np.sqrt(k)
        assert got == pytest.approx(want, abs=2e-4)
    # Inside the training range per feature means no out-of-range share, and vice versa.
    lo = np.array([spec.stats[n].min for n in spec.names])
    hi = np.array([spec.stats[n].max for n in spec.names])
    outside = (rows < lo) | (rows > hi)
    assert score.out_of_range == [pytest.approx(v, abs=1e-4) for v in outside.mean(axis=1)]
    assert [len(o) for o in score.outside] == outside.sum(axis=1).tolist()


def test_training_distances_are_read_against_held_out_rows_and_faults() -> None:
    """Held-out rows lie about where training rows do; rows whose correlated columns were
    swapped lie far beyond every training row, while the diagonal distance barely moves."""
    data = demo_data()
    spec = training_spec(data.names, data.x_train)
    assert spec.centre is not None
    q = spec.centre.distance_quantiles
    assert 0.3 < q["0.5"] < 1.2 and q["0.5"] < q["0.9"] < q["0.99"] <= q["1.0"]
    full = OodReference.from_spec(spec)
    diagonal = OodReference.from_spec(FeatureSpec(spec.names, spec.stats))
    assert full is not None and diagonal is not None
    _, held_out = full.measure(data.x_test)
    assert np.median(held_out) == pytest.approx(q["0.5"], rel=0.3)
    assert np.mean(held_out > q["0.99"]) < 0.05
    swapped = data.x_test.copy()
    perimeter, area = data.names.index("mean perimeter"), data.names.index("mean area")
    swapped[:, [perimeter, area]] = swapped[:, [area, perimeter]]
    _, far = full.measure(swapped)
    _, near = diagonal.measure(swapped)
    assert np.median(far) > 5 * q["1.0"]
    assert np.median(far) > 3 * np.median(near)


def test_the_centre_travels_with_the_spec_and_old_specs_still_read() -> None:
    data = demo_data()
    spec = training_spec(data.names, data.x_train)
    doc = json.loads(json.dumps(spec.to_dict()))
    assert FeatureSpec.from_dict(doc) == spec
    assert FeatureSpec.from_dict(doc).with_lookup(None).centre == spec.centre
    del doc["centre"]
    old = FeatureSpec.from_dict(doc)
    assert old.centre is None and old.stats == spec.stats
    ref = OodReference.from_spec(old)
    assert ref is not None and ref.method == "diagonal"
    with pytest.raises(ValueError, match="of 1 features"):
        FeatureSpec(spec.names, spec.stats, centre=TrainingCentre(((1.0,),)))
    with pytest.raises(ValueError, match="row 1"):
        TrainingCentre(((1.0,), (0.5,)))


def test_a_wide_spec_keeps_no_correlation_and_measures_the_diagonal_distance() -> None:
    """The correlation's triangle grows as the square of the features and travels in every
    copy of the spec: 2,500 features made a 44 MB deployment state that stalled the gateway
    at each admin call (a helper's probe). Past 256 features the centre keeps the training
    distances of the diagonal distance only."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 300)) * rng.uniform(0.5, 3, 300) + rng.uniform(-5, 5, 300)
    names = [f"f{i}" for i in range(300)]
    spec = training_spec(names, x)
    assert spec.centre is not None and spec.centre.whitening == ()
    assert len(json.dumps(spec.to_dict())) < 300 * 600  # no longer a square of the features
    # written so that the version before reads it (a rolling upgrade): as no centre at all
    assert "centre" not in spec.to_dict() and "diagonal_centre" in spec.to_dict()
    back = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    ref = OodReference.from_spec(back)
    assert ref is not None and ref.method == "diagonal" and ref.project.shape == (300,)
    assert 0.8 < ref.training_distance["0.5"] < 1.2  # a training row: z-scores of ~1
    _, distance = ref.measure(x[:5])
    z = (x[:5] - x.mean(axis=0)) / x.std(axis=0)
    assert np.allclose(distance, np.sqrt((z * z).mean(axis=1)), rtol=1e-3)
    narrow = training_spec(names[:30], x[:, :30])  # as before: the correlation kept
    assert narrow.centre is not None and len(narrow.centre.whitening) == 30


def test_a_one_row_score_costs_microseconds() -> None:
    """Measured, not guessed: the figure the README states (about 6 us on a quiet core)."""
    data = demo_data()
    ref = OodReference.from_spec(training_spec(data.names, data.x_train))
    assert ref is not None
    row = data.x_test[:1]
    for _ in range(200):
        ref.score(row)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        ref.score(row)
    per_row_us = (time.perf_counter() - t0) / n * 1e6
    print(f"\nOOD score of a one-row request: {per_row_us:.1f} us")
    assert per_row_us < 200  # a generous bound for two shared cores under load


def test_a_batch_of_requests_scores_as_each_row_alone() -> None:
    """``score_many`` over requests of 1 to 100 rows (a NaN cell among them) gives each
    request the figures its rows give one by one, to four decimals."""
    data = demo_data()
    ref = OodReference.from_spec(training_spec(data.names, data.x_train))
    assert ref is not None
    rng = np.random.default_rng(11)
    x = data.x_test * rng.uniform(0.6, 1.4, size=data.x_test.shape)  # many cells outside
    x[3, 4] = np.nan
    parts = [x[0], x[1:2], x[2:40], x[40:140]]
    scores = ref.score_many(parts)
    assert [len(s.distance) for s in scores] == [1, 1, 38, 100]
    rows = [row for part in parts for row in np.atleast_2d(part)]
    flat = [(s.out_of_range[i], s.distance[i], s.outside[i]) for s in scores
            for i in range(len(s.distance))]  # fmt: skip
    for row, (share, distance, outside) in zip(rows, flat, strict=True):
        cells = (row < ref.lo) | (row > ref.hi)
        assert outside == [ref.names[i] for i in np.flatnonzero(cells)]
        assert share == float("%.4f" % (cells.sum() / ref.width))
        alone = float(np.sqrt(np.sum((row @ ref.project - ref.offset) ** 2)))
        assert (np.isnan(distance) and np.isnan(alone)) or distance == pytest.approx(
            alone, abs=1e-4
        )
    assert any(flat_row[2] for flat_row in flat) and any(not f[2] for f in flat)


def test_the_sketch_counts_the_records_distance() -> None:
    """The drift report's distance histogram is of the very figure the records carry."""
    data = demo_data()
    spec = training_spec(data.names, data.x_train)
    ref = FeatureReference.from_spec(spec)
    assert ref is not None and ref.ood is not None
    rows = data.x_test[:50]
    ood_rows, per_feature, distance = ref.evidence(rows)
    score = ref.ood.score(rows)
    assert ood_rows == sum(1 for o in score.outside if o)
    assert per_feature.sum() == sum(len(o) for o in score.outside)
    sketch = Sketch()
    sketch.add_evidence(ood_rows, per_feature, distance)
    from rendezvous.drift import DISTANCE_EDGES

    want = np.histogram(np.clip(score.distance, 0, 1000), bins=DISTANCE_EDGES)[0]
    assert sketch.distance.tolist() == want.tolist()


# -- the decision record --------------------------------------------------------------------


def _record(ood: OodScore | None) -> DecisionRecord:
    result = ModelResult(
        request_id="r1", deployment="d", role="real", model="m", version=2, labels=[1, 0],
        probabilities=np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32),
        classes=[0, 1], model_latency_ms=0.5, queue_ms=0.2,
    )  # fmt: skip
    return build_decision(
        request_id="r1", deployment="d", started_ms=1.0, expected_roles=["real"],
        results={"real": result}, chosen_role="real", outcome="real", answered_after_ms=2.0,
        ood=ood,
    )  # fmt: skip


def test_a_record_carries_its_ood_score_and_reads_back() -> None:
    score = OodScore([0.0, 0.0333], [0.71, 9.5], [[], ["mean area"]])
    rec = _record(score)
    back = DecisionRecord.decode(rec.encode())
    assert back.ood == score and back == rec
    calm = _record(OodScore([0.0, 0.0], [0.71, 0.9], [[], []], "diagonal"))
    wire = msgpack.unpackb(calm.encode()[FIELD])["ood"]
    assert wire == {"out_of_range": [0.0, 0.0], "distance": [0.71, 0.9], "method": "diagonal"}
    assert DecisionRecord.decode(calm.encode()) == calm
    view = rec.to_dict()
    assert view["ood"] == {"out_of_range": [0.0, 0.0333], "distance": [0.71, 9.5],
                           "outside": [[], ["mean area"]], "method": "mahalanobis"}  # fmt: skip
    view["ood"]["outside"][1].append("changed")  # a copy: the record stays as it was
    assert rec.ood is not None and rec.ood.outside[1] == ["mean area"]
    assert DecisionRecord.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


def test_a_record_without_ood_writes_none_and_old_records_still_decode() -> None:
    rec = _record(None)
    doc = msgpack.unpackb(rec.encode()[FIELD], raw=False)
    assert "ood" not in doc  # no bytes spent on records without it
    assert DecisionRecord.decode(rec.encode()).ood is None
    with_score = msgpack.unpackb(_record(OodScore([0.0], [1.0], [[]])).encode()[FIELD])
    del with_score["ood"]  # a record as the previous release wrote it
    assert DecisionRecord.decode({FIELD: msgpack.packb(with_score)}).ood is None
    with_score["ood"] = {"out_of_range": [0.0], "distance": [1.0, 2.0]}
    with pytest.raises(DecisionFormatError, match="differ in rows"):
        DecisionRecord.decode({FIELD: msgpack.packb(with_score)})


# -- the feature view's shaping ---------------------------------------------------------------


def test_the_feature_view_reads_the_monitors_window_and_history() -> None:
    data = demo_data()
    spec = FeatureSpec(tuple(data.names), training_stats(data.names, data.x_train))
    ref = FeatureReference.from_spec(spec)
    assert ref is not None
    rows = data.x_test.copy()
    area = data.names.index("mean area")
    rows[:40, area] *= 10  # a unit change on 40 of 143 rows
    sketch = Sketch(real_model="m:2", start_ms=1.0, end_ms=2.0)
    sketch.add_features(ref.bin(rows), len(rows), version=ref.version)
    sketch.add_evidence(*ref.evidence(rows))
    shot = drift_features.snapshot(sketch, ref, now_ms=5.0)
    assert shot is not None
    psi = {n: 0.01 for n in data.names} | {"mean area": 2.5}
    point = drift_features.point(shot, psi, spec)
    raw_points = [(b"2-0", {b"p": json.dumps({**point, "ts_ms": 9.0}).encode()}),
                  (b"1-0", {b"p": json.dumps(point).encode()})]  # fmt: skip
    doc = drift_features.view(spec, ref, None, json.dumps(shot).encode(), raw_points)
    assert doc["feature"] == "mean area"  # the default: the highest PSI
    live = doc["live"]
    assert live["rows"] == len(rows) and sum(live["counts"]) == len(rows)
    above = rows[:, area] > spec.stats["mean area"].max
    assert live["out_of_range_rows"] == int(above.sum()) >= 35
    assert live["shares"][-1] > 0.25  # the top decile holds the scaled rows
    train = doc["training"]
    assert train["edges"][0] == spec.stats["mean area"].min
    assert train["edges"][-1] == spec.stats["mean area"].max
    assert len(train["edges"]) == len(train["shares"]) + 1 == len(live["counts"]) + 1
    assert sum(train["shares"]) == pytest.approx(1.0, abs=1e-5)  # each shown to 6 decimals
    assert [p["ts_ms"] for p in doc["history"]] == [5.0, 9.0]  # oldest first
    assert doc["history"][0]["out_of_range_rate"] == pytest.approx(above.mean(), abs=1e-6)
    assert doc["history"][0]["psi"] == 2.5
    assert [f["feature"] for f in doc["features"]] == list(data.names)

    other = drift_features.view(spec, ref, "mean radius", json.dumps(shot).encode(), [])
    assert other["feature"] == "mean radius" and other["history"] == []
    radius = rows[:, data.names.index("mean radius")]
    stats = spec.stats["mean radius"]
    outside = int(((radius < stats.min) | (radius > stats.max)).sum())
    assert other["live"]["out_of_range_rows"] == outside < 5  # held-out rows, unscaled
    with pytest.raises(drift_features.UnknownFeature, match="'nope' is not in"):
        drift_features.view(spec, ref, "nope", None, [])
    empty = drift_features.view(spec, ref, None, None, [])
    assert empty["feature"] == data.names[0] and empty["live"] is None
    # Counts made against other training statistics are not shown against these.
    stale = {**shot, "feature_version": "fr-other"}
    assert drift_features.view(spec, ref, None, json.dumps(stale).encode(), [])["live"] is None
    # The latest evaluation ranks the features, as /drift has them: the history point (written
    # every few seconds at most) named another feature than /drift for the same evaluation.
    now = {**shot, "psi": [3.0 if n == "mean radius" else 0.01 for n in data.names]}
    doc = drift_features.view(spec, ref, None, json.dumps(now).encode(), raw_points)
    assert doc["feature"] == "mean radius"
    by_name = {f["feature"]: f for f in doc["features"]}
    assert by_name["mean radius"]["psi"] == 3.0 and by_name["mean area"]["psi"] == 0.01
    assert by_name["mean area"]["out_of_range_rate"] == pytest.approx(above.mean(), abs=1e-6)
