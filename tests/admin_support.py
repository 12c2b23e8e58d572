"""Helpers of the admin, registry and promotion tests: extra model versions trained with the
demo helpers (exported to ONNX, never pickled), and admin API calls."""

from __future__ import annotations

import base64
import functools
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import onnx
from fastapi import FastAPI
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


class AppClient(httpx.Client):
    """An HTTP client of an app served by uvicorn in a thread of this process (real HTTP, and
    the app's state stays at hand for assertions)."""

    serving: ClassVar[set[AppClient]] = set()
    """The clients whose app still serves: conftest fails a test that leaves one behind."""

    def __init__(self, app: FastAPI):
        import threading

        import uvicorn

        from rendezvous.bus.server import free_port

        port = free_port()
        super().__init__(base_url=f"http://127.0.0.1:{port}", timeout=30)
        self.app = app
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        AppClient.serving.add(self)
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start")
            time.sleep(0.02)

    def close(self) -> None:
        AppClient.serving.discard(self)
        super().close()
        self.server.should_exit = True
        self.thread.join(15)
        slow = self.thread.is_alive()
        where = ""
        if slow:  # never leave a live app (its drift monitor, its job readers) on the
            # session's Redis: once, one judged the next test's deployment with its defaults
            self.server.force_exit = True
            self.thread.join(15)
        if self.thread.is_alive():  # its shutdown hangs: say where, and stop its loop
            where = self._stuck()
            self.thread.join(5)
        assert not slow, f"the app did not shut down within 15 s{where}"

    def _stuck(self) -> str:
        """Where a shutdown that hangs waits (the thread's stack, the loop's tasks), after
        which its event loop is stopped, so that the app does nothing more."""
        import asyncio
        import sys
        import traceback

        frame = sys._current_frames().get(self.thread.ident or 0)
        lines = traceback.format_stack(frame) if frame is not None else []
        loops = {srv.get_loop() for srv in getattr(self.server, "servers", [])}
        for loop in loops:
            try:  # read from another thread: good enough to say where it waits
                for task in list(asyncio.all_tasks(loop)):
                    stack = task.get_stack(limit=8)
                    lines.append(f"task {task.get_name()}: {task.get_coro()!r}\n")
                    lines += traceback.format_stack(stack[-1]) if stack else []
            except RuntimeError as exc:
                lines.append(f"(tasks unreadable: {exc})\n")
            loop.call_soon_threadsafe(loop.stop)
        return "; it waits at:\n" + "".join(lines)

    def __exit__(self, *exc: object) -> None:
        # httpx.Client's own __exit__ closes its transport but never calls close(): a `with`
        # block would leave the app serving (its readers retrying a stopped Redis, their
        # warnings landing in a later test's log capture)
        self.close()


def two_column_model(width: int, probabilities: str, label: str) -> bytes:
    """A hand-made ONNX classifier: the first two input columns through the operator
    ``probabilities`` (given them, or twice for a binary one such as Div), then ``label`` of
    those (ArgMax, ArgMin): graphs that scikit-learn would never export, for the checks."""
    h = onnx.helper
    arity = {"Div": ["two", "two"]}.get(probabilities, ["two"])
    extra = {"axis": 1} if probabilities == "Softmax" else {}
    graph = h.make_graph(
        [
            h.make_node("Slice", ["x", "starts", "ends", "axes"], ["two"]),
            h.make_node(probabilities, arity, ["probabilities"], **extra),
            h.make_node(label, ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "two-columns",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, width])],
        [
            h.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
            h.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 2]),
        ],
        [
            h.make_tensor("starts", onnx.TensorProto.INT64, [1], [0]),
            h.make_tensor("ends", onnx.TensorProto.INT64, [1], [2]),
            h.make_tensor("axes", onnx.TensorProto.INT64, [1], [1]),
        ],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    return bytes(model.SerializeToString())
