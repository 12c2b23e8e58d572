"""The one way into predict for every transport: ``PredictFastPath.answer`` turns a deployment,
a body and a request id into the HTTP answer, through ``PredictionService.predict``.

Three callers share it: this module's plain ASGI handler in front of the FastAPI app, the
connection-level protocol of ``gateway.transport.http_protocol``, and the FastAPI route that
documents predict in the OpenAPI schema (``gateway.transport.app``). Profiling showed the
framework around the predict route costing more CPU than everything the route does
(FastAPI's dependency solving, request object, exception wrapping and response classes: ~110
µs of a ~530 µs request at concurrency 64, then ~20 µs for the middleware layers), so
``PredictFastPath`` is the ASGI app uvicorn serves and answers predict itself; every other
request and the lifespan go on to the FastAPI app.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.dataplane.failures import problem_of
from gateway.dataplane.service import PredictionService
from gateway.problems import Problem, unavailable
from gateway.transport.limits import BodyCap, send_problem
from gateway.transport.urls import PREDICT_PATH

log = logging.getLogger(__name__)

Reply = tuple[int, bytes, list[tuple[bytes, bytes]]]
"""(status, JSON body, headers besides content-type and content-length)."""


def ok(doc: Any) -> Reply:
    return 200, json.dumps(doc, separators=(",", ":")).encode(), []


class PredictFastPath:
    """Serves predict; hands everything else to ``app``, whose lifespan builds the service."""

    def __init__(self, app: FastAPI, max_body_bytes: int):
        self.app = app
        self.cap = BodyCap(max_body_bytes)
        self._service: PredictionService | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = PREDICT_PATH.match(scope["path"])
            if match is not None:
                await self._predict(match.group(1), scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check_headers(self, headers: list[tuple[bytes, bytes]]) -> tuple[str | None, Reply | None]:
        """The caller's request id, and the answer to give at once if the headers already
        rule the request out (a declared body over the cap, a malformed length)."""
        request_id = None
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
        problem = self.cap.refuse_headers(headers)
        return request_id, None if problem is None else problem.reply()

    async def answer(self, deployment: str, raw: bytes, request_id: str | None) -> Reply:
        """Predict, with every failure turned into its HTTP answer."""
        service = self._service or self._started_service()
        if service is None:
            return unavailable("the gateway is starting").reply()
        return await predict_reply(service, deployment, raw, request_id)

    async def _predict(self, deployment: str, scope: Scope, receive: Receive, send: Send) -> None:
        request_id, refused = self.check_headers(scope["headers"])
        if refused is not None:
            await _send(send, refused)
            return
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if self.cap.exceeded(size):
                await send_problem(send, self.cap.too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        await _send(send, await self.answer(deployment, raw, request_id))

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


async def _send(send: Send, answer: Reply) -> None:
    status, body, extra = answer
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})
