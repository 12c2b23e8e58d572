"""Baseline (a): the smallest honest FastAPI app serving the same ONNX model in-process.

It takes the gateway's ``{"instances": [[...], ...]}`` body on the gateway's path, validates it
with pydantic, runs onnxruntime on the event loop (one thread, as the project's workers do) and
answers the gateway's response shape with a ``JSONResponse``. No Redis, no canary, no archive:
the floor that the full rendezvous path is measured against. Like the gateway (its
``RDV_REQUESTS_PER_CONNECTION``), it closes a keep-alive connection after 100 requests, so that
the few connections of a low concurrency, opened in a burst, do not all stay on the uvicorn
worker that happened to accept them (``benchmarks/PROFILE.md``: an unbalanced baseline read
half its throughput at concurrency 8, and the rows ratio followed that luck).

Run: ``BENCH_MODEL_PATH=.../model.onnx uvicorn benchmarks.inprocess_app:create_app --factory``.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS_PER_CONNECTION = 100
"""As the gateway's default where several processes share a port
(``gateway.transport.guarded_protocol.SHARED_PORT_REQUESTS_PER_CONNECTION``)."""


class PredictRequest(BaseModel):
    instances: list[list[float]] = Field(min_length=1, max_length=1000)


class ReconnectEvery:
    """Answers a connection's ``every``-th request with ``Connection: close`` (uvicorn then
    closes it and the client reconnects to whichever worker accepts first), as nginx's
    ``keepalive_requests`` does. A connection is told apart by its client address."""

    def __init__(self, app: ASGIApp, every: int = REQUESTS_PER_CONNECTION):
        self.app = app
        self.every = every
        self.counts: dict[object, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        count = self.counts.get(client, 0) + 1
        if count < self.every:
            self.counts[client] = count
            await self.app(scope, receive, send)
            return
        self.counts.pop(client, None)

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, closing)


def _session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def create_app(model_path: str | None = None) -> FastAPI:
    session = _session(model_path or os.environ["BENCH_MODEL_PATH"])
    input_name = session.get_inputs()[0].name
    version = int(os.environ.get("BENCH_MODEL_VERSION", "2"))
    app = FastAPI(title="in-process baseline")
    app.add_middleware(ReconnectEvery)

    @app.post("/v1/deployments/{deployment}/predict")
    async def predict(deployment: str, body: PredictRequest) -> JSONResponse:
        t0 = time.perf_counter()
        x = np.asarray(body.instances, dtype=np.float32)
        labels, proba = session.run(None, {input_name: x})
        predictions = [
            {"label": int(label), "probabilities": {"0": row[0], "1": row[1]}}
            for label, row in zip(labels.tolist(), proba.tolist(), strict=True)
        ]
        return JSONResponse(
            {
                "request_id": uuid.uuid4().hex,
                "model": {"name": deployment, "version": version, "role": "real"},
                "predictions": predictions,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
            }
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
