"""The one way into predict: ``predict_reply`` turns a deployment, a body and a request id
into the HTTP answer, through ``PredictionService.predict``.

Two callers share it: ``PredictFastPath``, the plain ASGI handler that uvicorn serves in front
of the FastAPI app, and the FastAPI route that documents predict in the OpenAPI schema
(``gateway.transport.app``). Profiling showed the framework around the predict route costing
more CPU than everything the route does (FastAPI's dependency solving, request object,
exception wrapping and response classes: ~110 µs of a ~530 µs request at concurrency 64, then
~20 µs for the middleware layers), so the handler answers predict itself and hands every other
request and the lifespan to the FastAPI app. (A protocol subclass that answered predict below
ASGI was measured against this in paired runs and did not win beyond the noise:
``benchmarks/PROFILE.md``.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.dataplane.failures import problem_of
from gateway.dataplane.service import PredictionService
from gateway.problems import RETRY, Problem, unavailable
from gateway.transport.limits import BodyCap, Reply, send_reply
from rendezvous.names import NAME_RE

log = logging.getLogger(__name__)

PREDICT_PATH = re.compile(rf"/v1/deployments/({NAME_RE})/predict")
"""A predict path (ASGI: decoded, no query string), named as a Redis key names a deployment."""

SHUTTING_DOWN = Problem(503, "the gateway is shutting down", headers=RETRY, close=True)


def ok(doc: dict[str, Any]) -> Reply:
    """The answer, or a 502 naming the model when it answered a non-finite number (JSON has
    none; found by the encoder, so the answers that are fine pay nothing for the check)."""
    try:
        return 200, json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), []
    except ValueError:
        model = doc.get("model") or {}
        detail = (
            f"model {model.get('name')} v{model.get('version')} ({model.get('role')}) answered "
            "a non-finite probability"
        )
        return Problem(502, detail).reply()


class PredictFastPath:
    """Serves predict; hands everything else to ``app``, whose lifespan builds the service."""

    def __init__(self, app: FastAPI, max_body_bytes: int):
        self.app = app
        self.cap = BodyCap(max_body_bytes)
        self._service: PredictionService | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = PREDICT_PATH.fullmatch(scope["path"])
            if match is not None:
                await self._predict(match.group(1), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _predict(self, deployment: str, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.cap.refuse_headers(scope["headers"])
        if refused is not None:  # a declared body over the cap, a malformed length
            await send_reply(send, refused.reply())
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.cap.exceeded(size):
                await send_reply(send, self.cap.too_large().reply())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        service = self._service or self._started_service()
        try:
            if service is None:
                answer = unavailable("the gateway is starting").reply()
            else:
                answer = await predict_reply(service, deployment, raw, request_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running once its graceful shutdown period is
            # over: the caller gets a 503 to retry elsewhere instead of uvicorn's 500. The
            # cancel has done its work (the request ends here), so it goes no further.
            await send_reply(send, SHUTTING_DOWN.reply())
            return
        await send_reply(send, answer)

    def _started_service(self) -> PredictionService | None:
        self._service = getattr(self.app.state, "service", None)
        return self._service


async def predict_reply(
    service: PredictionService, deployment: str, raw: bytes, request_id: str | None
) -> Reply:
    """``service.predict`` as an HTTP answer; a failure that is a bug is a logged 500 and the
    gateway keeps serving."""
    try:
        return ok(await service.predict(deployment, raw, request_id))
    except Exception as exc:
        problem = problem_of(exc)
        if problem is None:
            log.exception("predict %s failed", deployment)
            problem = Problem(500, "internal server error")
        return problem.reply()
