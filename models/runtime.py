"""One ONNX model loaded in onnxruntime, scoring a float32 batch in one call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.meta import ModelMeta


class ModelLoadError(ValueError):
    """The artifact is not a loadable ONNX classifier that fits its metadata."""


def _session(source: Path | bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # One thread per worker process: scale by processes, and keep batches predictable.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            source if isinstance(source, bytes) else str(source),
            sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc


class OnnxClassifier:
    """A classifier exported by skl2onnx with ``zipmap=False``: outputs label and probabilities."""

    def __init__(self, source: Path | bytes, meta: ModelMeta):
        self.meta = meta
        self.session = _session(source)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(
                f"expected one input tensor [rows, features], the model has {len(inputs)}"
            )
        self.input_name = inputs[0].name
        width = inputs[0].shape[-1] if inputs[0].shape else None
        if isinstance(width, int) and width != meta.feature_spec.width:
            raise ModelLoadError(
                f"model input width is {width}, the feature spec has {meta.feature_spec.width}"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if len(outputs) != 2:
            raise ModelLoadError(
                f"expected a classifier's two outputs (label, probabilities), got {outputs}: "
                "this server serves classifiers (a regressor is not supported)"
            )
        self.label_output, self.proba_output = outputs

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> int:
        return self.meta.version

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64, rows) and probabilities (float32, rows x classes)."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        labels, proba = self.session.run(None, {self.input_name: x})
        return np.asarray(labels).astype(np.int64, copy=False), np.asarray(proba, np.float32)
