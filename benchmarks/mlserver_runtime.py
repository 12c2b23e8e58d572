"""Baseline (b): an MLServer inference runtime for the same ONNX model, run by onnxruntime.

There is no ``mlserver-onnx`` package on the registry, so this is the custom runtime an MLServer
user would write. It runs inside ``benchmarks/.venv-mlserver`` (MLServer imports it from the
model folder), never in the project's environment. Input: one FP32 tensor ``[rows, 30]``;
outputs: ``label`` (INT64) and ``probabilities`` (FP32 ``[rows, classes]``).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxClassifierRuntime(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(
            uri, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input_name = self._session.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        labels, proba = self._session.run(None, {self._input_name: x})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output("label", np.asarray(labels, dtype=np.int64)),
                NumpyCodec.encode_output("probabilities", np.asarray(proba, dtype=np.float32)),
            ],
        )
