"""One ONNX model loaded in onnxruntime, scoring a batch in one call, in its input's type."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.meta import ModelMeta
from rendezvous.input_types import DTYPES, EXACT_INTEGER, FLOAT32, ONNX_TYPES


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


class ModelAnswerError(RuntimeError):
    """The model's run was stopped past its time limit, or it answered other than one label and
    one row of probabilities per row: no answer for any request of the batch."""


class RunStopped(ModelAnswerError):
    """The model's run was stopped past its time limit (run again, it would hang again)."""


class RunLimit:
    """Stops a model run that outlasts ``limit_s``: onnxruntime checks its run options'
    terminate flag between the graph's nodes, a loop's included. A model that hangs on some
    input (a ``Loop`` sized by a feature, which the upload's dry run on training rows cannot
    see) held its worker for good, one request sufficing; a rollback did not free it (found
    by a helper's security probe). One watcher thread a process, waking a few times a second
    only while a run is under way."""

    def __init__(self, limit_s: float, tick_s: float = 0.25):
        self.limit_s = limit_s
        self.tick_s = tick_s
        self._runs: dict[int, tuple[ort.RunOptions, float]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    @staticmethod
    @functools.cache
    def shared(limit_s: float) -> RunLimit:
        """The process's one watcher for ``limit_s``: a worker host made one for every model
        it ever served, a thread each that never ended (281 after a helper's churn of
        deployments)."""
        return RunLimit(limit_s)

    @contextlib.contextmanager
    def bounded(self) -> Iterator[ort.RunOptions]:
        options = ort.RunOptions()
        self._runs[id(options)] = (options, time.monotonic() + self.limit_s)
        if self._thread is None:
            with self._starting:  # models of one host run in threads of their own
                if self._thread is None:
                    self._thread = threading.Thread(target=self._watch, name="model-run-limit",
                                                    daemon=True)  # fmt: skip
                    self._thread.start()
        if not self._wake.is_set():
            self._wake.set()
        try:
            yield options
        finally:
            del self._runs[id(options)]

    def _watch(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.tick_s)
            now = time.monotonic()
            for options, deadline in list(self._runs.values()):
                if now >= deadline:
                    options.terminate = True
            if not self._runs:
                self._wake.clear()
                if self._runs:  # one began meanwhile
                    self._wake.set()


PROBABILITY_NOISE = 1e-4
"""How far outside [0, 1] a probability may land by float32 rounding alone."""


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
        self.input_type = ONNX_TYPES.get(inputs[0].type, FLOAT32)
        """float32, float64, int64 or int32 (``rendezvous.input_types``; the upload refuses any
        other): skl2onnx's ``DoubleTensorType`` and ``Int64TensorType`` models take doubles
        and integers, which the gateway validated and the bus carried exactly."""
        self.input_dtype: np.dtype = DTYPES[self.input_type]
        """What the batch is cast to: a float32 batch to a float32 model, without a copy."""
        width = inputs[0].shape[-1] if inputs[0].shape else None
        if isinstance(width, int) and width != meta.feature_spec.width:
            raise ModelLoadError(
                f"model input width is {width}, the feature spec has {meta.feature_spec.width}"
            )
        outputs = [o.name for o in self.session.get_outputs()]
        if len(outputs) != 2:
            what = (
                "a regressor is not supported" if len(outputs) == 1
                else "export the classifier with those two alone"
            )  # fmt: skip
            raise ModelLoadError(
                f"expected a classifier's two outputs (label, probabilities), got {outputs}: "
                f"this server serves classifiers ({what})"
            )
        self.label_output, self.proba_output = outputs

    @property
    def name(self) -> str:
        return self.meta.name

    def takes(self, rows: np.ndarray) -> np.ndarray:
        """Trial rows (drawn, or an upload's reference rows) as this model can take them: for
        an integer model rounded to integers within what it takes (a cast alone truncated
        them, and wrapped values past its range); others as they are."""
        if self.input_dtype.kind != "i":
            return rows
        info = np.iinfo(self.input_dtype)
        low, high = max(info.min, -EXACT_INTEGER), min(info.max, EXACT_INTEGER)
        return np.clip(np.rint(np.asarray(rows, np.float64)), low, high).astype(self.input_dtype)

    @property
    def version(self) -> int:
        return self.meta.version

    def predict(
        self, features: np.ndarray, limit: RunLimit | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64, rows) and probabilities (float32, rows x classes); with ``limit``,
        a run past it is stopped. Anything but one label and one row of probabilities per row
        raises ``ModelAnswerError``: a model that answered one row for a batch of many gave
        every caller in the batch but the first no answer, or another's (found by a helper's
        security probe)."""
        x = np.ascontiguousarray(features, dtype=self.input_dtype)
        feeds = {self.input_name: x}
        if limit is None:
            raw_labels, raw_proba = self.session.run(None, feeds)
        else:
            with limit.bounded() as options:
                try:
                    raw_labels, raw_proba = self.session.run(None, feeds, options)
                except Exception:
                    if options.terminate:
                        raise RunStopped(
                            f"the model ran past {limit.limit_s:g} s (RDV_MODEL_RUN_LIMIT_S) "
                            "and was stopped"
                        ) from None
                    raise
        rows = len(x)
        labels = np.asarray(raw_labels).astype(np.int64, copy=False)
        if labels.ndim == 2 and labels.shape[1] == 1:  # a column of labels: one a row still
            labels = labels.reshape(rows) if labels.shape[0] == rows else labels
        proba = np.asarray(raw_proba, np.float32)
        if labels.shape != (rows,) or proba.ndim != 2 or proba.shape[0] != rows:
            raise ModelAnswerError(
                f"the model answered labels of shape {labels.shape} and probabilities of "
                f"shape {proba.shape} for {rows} rows"
            )
        # float32 sums of trees' votes land a hair outside [0, 1] (1.0000003576 answered to a
        # caller, found by a helper's probe): only such float noise is clipped, so that what
        # is not probabilities still shows (the upload's check reads these); a NaN stays one
        if (
            proba.size
            and proba.min() >= -PROBABILITY_NOISE
            and proba.max() <= 1 + PROBABILITY_NOISE
        ):
            proba = np.clip(proba, 0.0, 1.0, out=proba if proba.flags.writeable else None)
        return labels, proba
