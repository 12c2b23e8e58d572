"""Train the demo models on scikit-learn's bundled breast-cancer data and export them to ONNX.

Version 1 is a logistic-regression pipeline (the canary), version 2 a gradient-boosted
classifier (the real model). The data ships with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import clone
from sklearn.covariance import LedoitWolf
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from models.demo import (  # noqa: F401 - the demo's names, re-exported
    CANARY_VERSION,
    DEMO_DEPLOYMENT,
    DEMO_MODEL,
    REAL_VERSION,
    demo_models_present,
)
from models.meta import ModelMeta
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier
from rendezvous.drift import score_counts
from rendezvous.ood import OodReference
from rendezvous.spec import FeatureSpec, FeatureStats, TrainingCentre

log = logging.getLogger(__name__)

SEED = 0
QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Deciles: the cuts of the feature-drift histograms. Equal-mass bins keep the PSI of a
stationary window low and steady; tail levels (0.01, 0.99) hold one or two training rows each
and made the largest of 30 feature PSIs swing up to 0.5 on unshifted traffic (tests/test_drift)."""
CV_FOLDS = 5
DISTANCE_QUANTILES = (0.5, 0.9, 0.99, 1.0)
"""Of the training rows' distances to their centre, kept to read a live distance against."""


@dataclass(frozen=True)
class DemoData:
    names: list[str]
    class_names: list[str]
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def demo_data() -> DemoData:
    """The fixed split every demo model and test uses (stratified, seed 0, 25 % held out)."""
    ds = load_breast_cancer()
    x = ds.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, ds.target, test_size=0.25, random_state=SEED, stratify=ds.target
    )
    return DemoData(
        names=[str(n) for n in ds.feature_names],
        class_names=[str(n) for n in ds.target_names],
        x_train=x_train,
        x_test=x_test,
        y_train=y_train,
        y_test=y_test,
    )


def training_stats(names: list[str], x: np.ndarray) -> dict[str, FeatureStats]:
    stats = {}
    for i, name in enumerate(names):
        col = x[:, i].astype(np.float64)
        qs = np.quantile(col, QUANTILES)
        stats[name] = FeatureStats(
            mean=float(col.mean()),
            std=float(col.std()),
            min=float(col.min()),
            max=float(col.max()),
            quantiles={str(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        )
    return stats


def training_centre(
    names: list[str], x: np.ndarray, stats: dict[str, FeatureStats]
) -> TrainingCentre:
    """The shrunk correlation of the training rows as a whitening (``TrainingCentre``).
    Ledoit-Wolf rather than the sample covariance: 30 features over a few hundred rows, some
    nearly collinear (radius, perimeter, area), leave the sample covariance close to singular,
    and its inverse would make a tiny wobble of a collinear pair look like a gross outlier."""
    mean = np.asarray([stats[n].mean for n in names])
    std = np.asarray([stats[n].std if stats[n].std > 0 else 1.0 for n in names])
    z = (np.asarray(x, dtype=np.float64) - mean) / std
    correlation = LedoitWolf(assume_centered=True).fit(z).covariance_
    whitening = np.linalg.inv(np.linalg.cholesky(correlation))  # lower triangular
    rows = tuple(tuple(float(f"{v:.7g}") for v in whitening[i, : i + 1]) for i in range(len(names)))
    draft = FeatureSpec(names=tuple(names), stats=stats, centre=TrainingCentre(rows))
    reference = OodReference.from_spec(draft)
    assert reference is not None
    _, distance = reference.measure(x)
    qs = np.quantile(distance, DISTANCE_QUANTILES)
    return TrainingCentre(
        rows, {str(q): round(float(v), 4) for q, v in zip(DISTANCE_QUANTILES, qs, strict=True)}
    )


def training_spec(names: list[str], x: np.ndarray) -> FeatureSpec:
    """A spec with every training statistic the drift checks and the OOD score read."""
    stats = training_stats(names, x)
    return FeatureSpec(names=tuple(names), stats=stats, centre=training_centre(names, x, stats))


def score_reference(estimator: Any, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Share of out-of-fold positive-class scores per score bin (fresh clones, ``CV_FOLDS``
    folds of the training split): the scores the model gives rows it was not fitted on, which
    is what live traffic should look like, unlike its over-confident scores on its own
    training rows. The test split stays untouched for independent checks."""
    scores = cross_val_predict(clone(estimator), x, y, cv=CV_FOLDS, method="predict_proba")
    counts = score_counts(scores[:, 1])
    return [float(c) / float(counts.sum()) for c in counts]


def export_onnx(estimator: Any, width: int) -> bytes:
    """ONNX with a float32 input ``features`` [batch, width], outputs label and probabilities
    (no ZipMap, so probabilities are one tensor)."""
    final = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    onx = to_onnx(
        estimator,
        initial_types=[("features", FloatTensorType([None, width]))],
        options={id(final): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    return bytes(onx.SerializeToString())


def _candidates() -> dict[int, tuple[str, Any]]:
    return {
        CANARY_VERSION: (
            "logistic-regression",
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=SEED)),
        ),
        REAL_VERSION: (
            "gradient-boosting",
            GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=SEED),
        ),
    }


def train_demo(registry: ModelRegistry, force: bool = False) -> list[ModelMeta]:
    """Train, export, check the ONNX against scikit-learn, and store both demo versions."""
    data = demo_data()
    spec = training_spec(data.names, data.x_train)
    stored = []
    for version, (algorithm, estimator) in _candidates().items():
        if registry.exists(DEMO_MODEL, version) and not force:
            stored.append(registry.meta(DEMO_MODEL, version))
            continue
        estimator.fit(data.x_train, data.y_train)
        onnx_bytes = export_onnx(estimator, len(data.names))
        meta = ModelMeta(
            name=DEMO_MODEL,
            version=version,
            feature_spec=spec,
            classes=[int(c) for c in estimator.classes_],
            class_names=data.class_names,
            sha256="",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            algorithm=algorithm,
            description=f"demo {algorithm} on the breast-cancer data",
        )
        onnx_model = OnnxClassifier(onnx_bytes, meta)
        labels, _ = onnx_model.predict(data.x_test)
        accuracy = float((labels == data.y_test).mean())
        agreement = float((labels == estimator.predict(data.x_test)).mean())
        if agreement < 0.99:
            raise RuntimeError(f"ONNX export of {algorithm} disagrees with scikit-learn")
        meta = ModelMeta.from_dict(
            {
                **meta.to_dict(),
                "metrics": {"test_accuracy": accuracy, "onnx_agreement": agreement},
                "score_reference": score_reference(estimator, data.x_train, data.y_train),
            }
        )
        stored.append(registry.save(meta, onnx_bytes))
        log.info(
            "trained %s v%d (%s): test accuracy %.3f", DEMO_MODEL, version, algorithm, accuracy
        )
    return stored
