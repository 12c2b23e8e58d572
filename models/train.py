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
from models.reference import (  # noqa: F401 - re-exported: the demo's statistics
    prediction_references,
    scores_reference,
    training_centre,
    training_spec,
    training_stats,
)
from models.registry import ModelRegistry
from models.runtime import OnnxClassifier

log = logging.getLogger(__name__)

SEED = 0
CV_FOLDS = 5


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


def prediction_reference(estimator: Any, x: np.ndarray, y: np.ndarray) -> dict[str, list[float]]:
    """The model's ``score_reference`` (and, with three classes or more, its
    ``class_reference``) from out-of-fold probabilities (fresh clones, ``CV_FOLDS`` folds of
    the training split): the answers the model gives rows it was not fitted on, which is what
    live traffic should look like, unlike its over-confident scores on its own training rows.
    The test split stays untouched for independent checks."""
    proba = cross_val_predict(clone(estimator), x, y, cv=CV_FOLDS, method="predict_proba")
    return prediction_references(proba)


def score_reference(estimator: Any, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Share of out-of-fold scores per score bin (``prediction_reference``)."""
    return prediction_reference(estimator, x, y)["score_reference"]


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
                **prediction_reference(estimator, data.x_train, data.y_train),
            }
        )
        stored.append(registry.save(meta, onnx_bytes))
        log.info(
            "trained %s v%d (%s): test accuracy %.3f", DEMO_MODEL, version, algorithm, accuracy
        )
    return stored
