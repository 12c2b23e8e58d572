"""The predict route as a plain ASGI handler, in front of the FastAPI app.

Profiling showed the framework around the predict route costing more CPU than everything the
route does (FastAPI's dependency solving, request object, exception wrapping and response
classes: ~110 µs of a ~530 µs request at concurrency 64; then, with the route moved into a
middleware, the five middleware layers FastAPI and Starlette still put around it: ~20 µs).
Predict is the one hot route, so this handler is the ASGI app uvicorn serves, and it serves
predict directly: the body is read with the same size cap, the same
``PredictionService.predict`` does the work, and failures get the same answers through
``gateway.errors.problem``. Every other request (admin, metrics, health, the OpenAPI
documentation of predict itself) and the lifespan go on to the FastAPI app.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.errors import problem
from gateway.service import PredictionService

log = logging.getLogger(__name__)

PREDICT_PATH = re.compile(r"^/v1/deployments/([^/]+)/predict$")
_JSON = (b"content-type", b"application/json")


async def _respond(send: Send, status: int, doc: Any, headers: dict[str, str] | None = None,
                   close: bool = False) -> None:  # fmt: skip
    body = json.dumps(doc, separators=(",", ":")).encode()
    raw_headers = [_JSON, (b"content-length", str(len(body)).encode())]
    for name, value in (headers or {}).items():
        raw_headers.append((name.lower().encode(), value.encode()))
    if close:
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class PredictFastPath:
    """Serves predict; hands everything else to ``app``, whose lifespan builds the service."""

    def __init__(self, app: FastAPI, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._service: PredictionService | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = PREDICT_PATH.match(scope["path"])
            if match is not None:
                await self._predict(match.group(1), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _predict(self, deployment: str, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = None
        limit = self.max_body_bytes
        too_large = f"request body larger than {limit} bytes"
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _respond(send, 400, {"detail": "invalid Content-Length header"}, None,
                                   close=True)  # fmt: skip
                    return
                if declared > limit:
                    await _respond(send, 413, {"detail": too_large}, None, close=True)
                    return
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, 413, {"detail": too_large}, None, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        service = self._service or self._started_service()
        if service is None:
            await _respond(send, 503, {"detail": "the gateway is starting"}, {"Retry-After": "1"})
            return
        try:
            doc = await service.predict(deployment, raw, request_id)
        except Exception as exc:
            answer = problem(exc)
            if answer is None:  # a bug: say so to the caller and in the log, keep serving
                log.exception("predict %s failed", deployment)
                await _respond(send, 500, {"detail": "internal server error"})
                return
            status, body, headers = answer
            await _respond(send, status, body, headers)
            return
        await _respond(send, 200, doc)

    def _started_service(self) -> PredictionService | None:
        self._service = getattr(self.app.state, "service", None)
        return self._service
