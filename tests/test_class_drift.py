"""Prediction drift of a multiclass model: its reference (the top probability's histogram and
the predicted-class mix on rows it was not fitted on), the class counts of the drift sketches,
the monitor's ``class_psi`` and ``class_js``, and, through the real gateway, a real 3-class
scikit-learn model exported with skl2onnx: alerted when the live class mix shifts, quiet on its
own mix. Binary models keep what they had."""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from admin_support import AUTH, TOKEN, AppClient
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gateway.observability.drift_sketches import ScoreReferences
from gateway.observability.drift_view import set_thresholds, thresholds_from
from gateway.settings import Settings
from gateway.transport.app import create_app
from models.meta import ModelMeta
from models.reference import prediction_references
from models.registry import ModelRegistry
from models.train import export_onnx
from models.worker import ModelWorker
from processes import wait_until
from rendezvous import names
from rendezvous.drift import Sketch, score_counts
from rendezvous.drift_alerts import Thresholds, evaluate_alerts, window_report
from rendezvous.drift_prior import prior_reference
from rendezvous.spec import FeatureSpec

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
LABELS = ["setosa", "versicolor", "virginica"]
DEP = "iris"
WINDOW = 200


@functools.cache
def iris() -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """A 3-class logistic regression fitted on 100 iris rows, as ONNX; the 50 held-out rows
    and their labels (the upload's reference), and its probabilities on them."""
    x, y = load_iris(return_X_y=True)
    x_fit, x_ref, y_fit, y_ref = train_test_split(
        x.astype(np.float32), y, test_size=50, random_state=0, stratify=y
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_fit, y_fit)
    return export_onnx(model, len(FEATURES)), x_ref, y_ref, model.predict_proba(x_ref)


# -- the reference ------------------------------------------------------------------------------


def test_a_multiclass_reference_is_its_top_probability_and_its_class_mix() -> None:
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.85, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    ref = prediction_references(proba)
    assert ref["class_reference"] == [0.5, 0.25, 0.25]
    expected = score_counts(np.array([0.7, 0.85, 0.5, 0.6])) / 4
    assert ref["score_reference"] == pytest.approx(expected.tolist())
    binary = prediction_references(np.array([[0.9, 0.1], [0.3, 0.7]]))
    assert set(binary) == {"score_reference"}  # the positive class's score, as before
    assert binary["score_reference"] == pytest.approx(score_counts(np.array([0.1, 0.7])) / 2)


def test_metadata_carries_the_class_mix_and_older_or_binary_metadata_reads_as_before() -> None:
    meta = ModelMeta(name="m", version=1, feature_spec=FeatureSpec.from_names(FEATURES),
                     classes=[0, 1, 2], class_names=LABELS, sha256="", created_at="t",
                     score_reference=[0.1] * 10, class_reference=[0.5, 0.25, 0.25])  # fmt: skip
    doc = meta.to_dict()
    assert ModelMeta.from_dict(doc).class_reference == [0.5, 0.25, 0.25]
    del doc["class_reference"]  # metadata stored before it
    old = ModelMeta.from_dict(doc)
    assert old.class_reference is None and "class_reference" not in old.to_dict()


def test_a_multiclass_prior_is_judged_against_the_class_reference_never_the_scores() -> None:
    """A multiclass score reference is of the top probability: its upper half is no class's
    share, and must not become a prediction prior; the class reference is the classes' shares
    (None where there is none, or it does not fit the classes)."""
    reference = [0.0] * 5 + [0.2] * 5
    assert prior_reference({"classes": [0, 1], "score_reference": reference}) == 1.0
    assert prior_reference({"classes": [0, 1, 2], "score_reference": reference}) is None
    three = {"classes": [0, 1, 2], "score_reference": reference}
    assert prior_reference({**three, "class_reference": [0.5, 0.25, 0.25]}) == [0.5, 0.25, 0.25]
    assert prior_reference({**three, "class_reference": [2, 1, 1]}) == [0.5, 0.25, 0.25]
    for bad in ([0.5, 0.5], [0.5, -0.25, 0.75], [0, 0, 0], ["a", 1, 1], [float("nan"), 1, 1]):
        assert prior_reference({**three, "class_reference": bad}) is None


# -- the sketches and the report ----------------------------------------------------------------


def test_sketches_count_the_predicted_classes_merge_and_travel() -> None:
    a, b = Sketch(real_model="m:1"), Sketch(real_model="m:1")
    a.add_predictions(np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]))
    b.add_predictions(np.array([[0.1, 0.1, 0.8]] * 3))
    assert a.predicted is not None and a.predicted.tolist() == [1, 1, 0]
    assert a.score_real.tolist() == score_counts(np.array([0.8, 0.7])).tolist()
    merged = Sketch.from_bytes(a.merge(b).to_bytes())
    assert merged.predicted is not None and merged.predicted.tolist() == [1, 1, 3]
    binary = Sketch(real_model="m:1")
    binary.add_scores(np.array([0.2, 0.9]), None)
    assert "predicted" not in msgpack.unpackb(binary.to_bytes())  # its bytes as before
    assert Sketch.from_bytes(binary.to_bytes()).predicted is None
    assert binary.merge(a).predicted.tolist() == [1, 1, 0]  # type: ignore[union-attr]


def _window(mix: list[float], requests: int = 400) -> Sketch:
    w = Sketch(real_model="m:1", requests=requests, rows=requests)
    w.predicted = np.round(np.asarray(mix) * requests).astype(np.int64)
    w.score_real = score_counts(np.full(requests, 0.9))
    return w


def _report(window: Sketch, reference: list[float] | None) -> dict[str, Any]:
    return window_report(window, score_reference=None, reference_source="training",
                         features=None, thresholds=Thresholds(),
                         class_reference=None if reference is None else np.asarray(reference),
                         class_labels=LABELS)  # fmt: skip


def test_a_shifted_class_mix_raises_class_drift_naming_the_class_that_moved() -> None:
    third = [1 / 3] * 3
    calm = _report(_window([0.34, 0.33, 0.33]), third)
    assert calm["classes"]["psi"] < 0.01 and calm["classes"]["reference_source"] == "training"
    assert evaluate_alerts(calm, Thresholds(), {}, 0.0) == ({}, [])
    shifted = _report(_window([0.7, 0.15, 0.15]), third)
    assert shifted["values"]["class_psi"] == shifted["classes"]["psi"] > Thresholds().class_psi
    active, events = evaluate_alerts(shifted, Thresholds(), {}, 0.0)
    assert set(active) == {"class_psi", "class_js"} == {e["kind"] for e in events}
    assert "setosa 70% of predictions, 33% in the reference" in active["class_psi"]["detail"]
    unknown = _report(_window([0.7, 0.15, 0.15]), None)  # no reference yet: nothing judged
    assert unknown["values"]["class_psi"] is None and unknown["classes"]["real"] is not None


def test_class_thresholds_hold_on_sampling_noise_and_see_a_class_mix_shift() -> None:
    """Windows of 200 requests drawn from the reference mix itself stay under the defaults;
    a third of each class becoming 60/20/20 is over both (the figures of ``Thresholds``)."""
    rng = np.random.default_rng(3)
    t = Thresholds()
    for mix in ([1 / 3] * 3, [0.8, 0.15, 0.05]):
        for counts in rng.multinomial(200, mix, size=500):
            w = Sketch(real_model="m:1", requests=200)
            w.predicted = counts.astype(np.int64)
            report = _report(w, mix)
            assert report["classes"]["psi"] < t.class_psi
            assert report["classes"]["js_distance"] < t.class_js
    shifted = _report(_window([0.6, 0.2, 0.2], 200), [1 / 3] * 3)["values"]
    assert shifted["class_psi"] > t.class_psi and shifted["class_js"] > t.class_js


async def test_stored_thresholds_stay_readable_by_the_version_before(
    r: redis.Redis, redis_url: str
) -> None:
    """The version before refuses a stored set holding a key it does not know ("unknown
    threshold 'class_psi'") and judges every kind on its defaults: a score_psi raised through
    an upgraded gateway was ignored by an older one's monitor during a rolling upgrade, and
    reset by its next change. The class thresholds are stored once they differ."""
    known_before = {"divergence_mean", "disagreement_rate", "score_psi", "score_js",
                    "feature_psi", "min_requests"}  # fmt: skip
    client = aioredis.Redis.from_url(redis_url)
    key = names.drift_thresholds_key(DEP)
    try:
        set_to = await set_thresholds(client, DEP, {"score_psi": 5.0}, Thresholds(), 1000)
        stored = json.loads(r.get(key) or b"{}")
        assert set(stored) == known_before and stored["score_psi"] == 5.0
        assert thresholds_from(r.get(key), Thresholds()) == set_to  # read back whole
        await set_thresholds(client, DEP, {"class_psi": 0.4}, Thresholds(), 1000)
        stored = json.loads(r.get(key) or b"{}")
        assert stored["class_psi"] == 0.4 and stored["score_psi"] == 5.0
        assert "class_js" not in stored
    finally:
        await client.aclose()


# -- the references the monitor reads -----------------------------------------------------------


async def test_without_a_training_mix_the_first_window_as_real_is_the_class_reference(
    r: redis.Redis, redis_url: str
) -> None:
    """A multiclass model stored before (no references in its metadata) is judged against its
    first full window as real, its class mix included."""
    stream = names.drift_sketch_stream(DEP)
    for mix in ([30, 10, 10], [20, 20, 10]):
        sketch = Sketch(real_model="old:1", requests=50, rows=50, start_ms=1.0, end_ms=2.0)
        sketch.add_predictions(np.eye(3)[np.repeat([0, 1, 2], mix)] * 0.8 + 0.0666)
        r.xadd(stream, {b"s": sketch.to_bytes()})
    meta = json.dumps({"classes": [0, 1, 2], "class_names": LABELS, "score_reference": None})
    client = aioredis.Redis.from_url(redis_url)
    try:
        refs = ScoreReferences(client, 100, None)
        first = await refs.of(DEP, "old", 1, meta.encode(), None)
        assert first.source == "promotion" and first.class_labels == LABELS
        assert first.classes is not None and first.classes.tolist() == [0.5, 0.3, 0.2]
        stored = await client.get(names.drift_reference_key(DEP))
        again = await ScoreReferences(client, 100, None).of(DEP, "old", 1, meta.encode(), stored)
        assert again.classes is not None and again.classes.tolist() == [0.5, 0.3, 0.2]
    finally:
        await client.aclose()


# -- through the real gateway -------------------------------------------------------------------


@pytest.fixture
def gateway(redis_url: str, r: redis.Redis, tmp_path: Path) -> Iterator[AppClient]:
    """The gateway app (its drift feed and monitor) with the iris model uploaded, with its
    reference rows, as the real model of a deployment, and a worker scoring it."""
    data = tmp_path / "data"
    data.mkdir()
    settings = Settings(redis_url=redis_url, data_dir=data, admin_token=TOKEN,
                        drift_interval_s=0.2, drift_window_requests=WINDOW,
                        drift_min_requests=100)  # fmt: skip
    onnx_bytes, x_ref, _y, _proba = iris()
    with AppClient(create_app(settings)) as gw:
        upload = {"name": DEP, "feature_names": FEATURES, "class_names": LABELS,
                  "onnx_base64": base64.b64encode(onnx_bytes).decode(),
                  "reference": {"columns": FEATURES, "rows": x_ref.tolist()}}  # fmt: skip
        resp = gw.post("/admin/models", json=upload, headers=AUTH)
        assert resp.status_code == 201, resp.text
        created = gw.post("/admin/deployments", headers=AUTH,
                          json={"name": DEP, "real": {"model": DEP, "version": 1}})  # fmt: skip
        assert created.status_code == 201, created.text
        worker = ModelWorker(redis.Redis.from_url(redis_url), ModelRegistry(data / "models"),
                             deployment=DEP, role="real", consumer="w", block_ms=100)  # fmt: skip
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:
            yield gw
        finally:
            stop.set()
            thread.join(10)


def _send(gw: AppClient, rows: np.ndarray) -> float:
    """One request a row, after the sketches of earlier traffic are flushed; returns when the
    phase began."""
    time.sleep(1.0)
    began = time.time() * 1000
    for row in rows:
        body = {"features": dict(zip(FEATURES, map(float, row), strict=True))}
        resp = gw.post(f"/v1/deployments/{DEP}/predict", json=body)
        assert resp.status_code == 200, resp.text
    return began


def _fresh(gw: AppClient, began: float) -> dict[str, Any]:
    """The first evaluation of a full window of the requests sent since ``began``."""

    def check() -> dict[str, Any] | None:
        doc = gw.get(f"/v1/deployments/{DEP}/drift").json()
        cur = doc.get("current") or {}
        full = cur.get("requests", 0) >= WINDOW and cur.get("from_ms", 0) >= began
        return doc if full and doc["evaluated_at_ms"] >= cur["to_ms"] else None

    return wait_until(check, 20, "a drift evaluation of the new traffic", interval_s=0.1)  # type: ignore[no-any-return]


def test_a_multiclass_models_class_mix_shift_is_alerted_and_its_own_mix_is_not(
    gateway: AppClient,
) -> None:
    _onnx, x_ref, y_ref, proba = iris()
    shown = gateway.get(f"/admin/models/{DEP}/1", headers=AUTH).json()
    mix = np.bincount(proba.argmax(axis=1), minlength=3) / len(proba)
    assert shown["class_reference"] == pytest.approx(mix.tolist(), abs=1e-9)
    rng = np.random.default_rng(5)

    calm = _fresh(gateway, _send(gateway, x_ref[rng.integers(0, len(x_ref), WINDOW)]))
    current = calm["current"]
    print("calm", current["values"], current["classes"])
    assert current["classes"]["labels"] == LABELS
    assert current["classes"]["reference_source"] == current["score"]["reference_source"]
    assert current["score"]["reference_source"] == "training"  # from the reference rows
    assert current["classes"]["psi"] < 0.05
    judged = {"class_psi", "class_js", "score_psi", "score_js"}
    assert not {a["kind"] for a in calm["alerts"]} & judged, calm["alerts"]

    setosa, others = x_ref[y_ref == 0], x_ref[y_ref != 0]
    picked = np.concatenate([setosa[rng.integers(0, len(setosa), WINDOW * 4 // 5)],
                             others[rng.integers(0, len(others), WINDOW // 5)]])  # fmt: skip
    drifted = _fresh(gateway, _send(gateway, rng.permutation(picked)))
    print("shifted", drifted["current"]["values"], drifted["current"]["classes"])
    alerts = {a["kind"]: a for a in drifted["alerts"]}
    assert {"class_psi", "class_js"} <= set(alerts), drifted["alerts"]
    assert "most moved: setosa" in alerts["class_psi"]["detail"]
    assert {e["kind"] for e in drifted["events"] if e["type"] == "raised"} >= {"class_psi"}
    metrics = gateway.get("/metrics").text
    psi = drifted["current"]["classes"]["psi"]
    assert f'rdv_drift_class_psi{{deployment="{DEP}"}} {psi}' in metrics
    assert f'rdv_drift_alert{{deployment="{DEP}",kind="class_psi"}} 1.0' in metrics
