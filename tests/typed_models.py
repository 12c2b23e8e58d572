"""Models whose input is not float32, as data scientists convert them with skl2onnx: count
features with ``Int64TensorType``, a pipeline with ``DoubleTensorType``; and the string input
(``StringTensorType``) the server refuses. Real scikit-learn models, exported to ONNX, cached."""

from __future__ import annotations

import base64
import functools
from typing import Any

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import (
    DoubleTensorType,
    FloatTensorType,
    Int64TensorType,
    StringTensorType,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

NAMES = ["visits", "clicks", "days"]
TENSOR_TYPES = {"int64": Int64TensorType, "double": DoubleTensorType, "float": FloatTensorType}


@functools.cache
def counts() -> tuple[np.ndarray, np.ndarray]:
    """Integer count features and a label that follows two of them."""
    x = np.random.default_rng(0).poisson(5, size=(300, len(NAMES))).astype(np.int64)
    return x, (x[:, 0] + x[:, 1] > 10).astype(np.int64)


@functools.cache
def fitted() -> Any:
    x, y = counts()
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)


@functools.cache
def typed_onnx(kind: str) -> bytes:
    """The count model as skl2onnx converts it with an input of ``kind`` (int64, double,
    float)."""
    model = fitted()
    onx = to_onnx(model, initial_types=[("x", TENSOR_TYPES[kind]([None, len(NAMES)]))],
                  options={id(model): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    return bytes(onx.SerializeToString())


@functools.cache
def string_onnx() -> bytes:
    """A one-hot encoded text feature, converted with ``StringTensorType``."""
    words = np.array([["red"], ["blue"], ["green"], ["blue"]] * 20)
    model = make_pipeline(OneHotEncoder(), LogisticRegression())
    model.fit(words, np.array([0, 1, 0, 1] * 20))
    onx = to_onnx(model, initial_types=[("x", StringTensorType([None, 1]))],
                  options={id(model): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})  # fmt: skip
    return bytes(onx.SerializeToString())


def upload(kind: str, name: str) -> dict[str, Any]:
    """An admin upload body of the count model with reference rows (its own features)."""
    x, _ = counts()
    return {
        "name": name,
        "feature_names": NAMES,
        "onnx_base64": base64.b64encode(typed_onnx(kind)).decode(),
        "reference": {"columns": NAMES, "rows": x[:60].tolist()},
    }
