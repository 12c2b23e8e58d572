"""Helpers of the admin, registry and promotion tests: extra model versions trained with the
demo helpers (exported to ONNX, never pickled), and admin API calls."""

from __future__ import annotations

import base64
import functools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.train import DEMO_MODEL, demo_data, export_onnx

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@functools.cache
def variant_onnx(kind: str) -> bytes:
    """ONNX bytes of a small extra model on the demo data.

    ``weak``: a strongly regularised logistic regression (close to real, not equal);
    ``flipped``: trained on inverted labels (disagrees with real almost always);
    ``narrow``: takes only the first 10 features (the wrong input width)."""
    data = demo_data()
    x, y = data.x_train, data.y_train
    if kind == "narrow":
        x = x[:, :10]
    if kind == "flipped":
        y = 1 - y
    c = 0.01 if kind == "weak" else 1.0
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    model.fit(x, y)
    return export_onnx(model, x.shape[1])


def upload_body(kind: str, **meta: Any) -> dict[str, Any]:
    return {
        "name": DEMO_MODEL,
        "deployment": "breast-cancer",
        "algorithm": f"logistic-regression ({kind})",
        "onnx_base64": base64.b64encode(variant_onnx(kind)).decode(),
        **meta,
    }


def copy_demo_models(demo_data_dir: Path, data_dir: Path) -> Path:
    """A data folder of its own holding the session's demo models (uploads stay local)."""
    shutil.copytree(demo_data_dir / "models", data_dir / "models")
    return data_dir


def features_body(row: np.ndarray) -> dict[str, Any]:
    return {"features": dict(zip(demo_data().names, map(float, row), strict=True))}
