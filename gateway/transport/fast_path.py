"""The predict route without a framework: as a plain ASGI handler in front of the FastAPI app,
and as the answer that ``gateway.transport.http_protocol`` writes straight to the connection.

Profiling showed the framework around the predict route costing more CPU than everything the
route does (FastAPI's dependency solving, request object, exception wrapping and response
classes: ~110 µs of a ~530 µs request at concurrency 64; then, with the route moved into a
middleware, the five middleware layers FastAPI and Starlette still put around it: ~20 µs).
Predict is the one hot route, so ``PredictFastPath`` is the ASGI app uvicorn serves, and it
serves predict directly: the body is read with the same size cap, the same
``PredictionService.predict`` does the work, and failures get the same answers through
``gateway.transport.problems.problem``. Every other request (admin, metrics, health, the OpenAPI
documentation of predict itself) and the lifespan go on to the FastAPI app.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.dataplane.service import PredictionService
from gateway.transport.problems import problem

log = logging.getLogger(__name__)

PREDICT_PATH = re.compile(r"^/v1/deployments/([^/]+)/predict$")

Reply = tuple[int, bytes, list[tuple[bytes, bytes]]]
"""(status, JSON body, headers besides content-type and content-length)."""

_CLOSE = [(b"connection", b"close")]


def reply(status: int, doc: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(doc, separators=(",", ":")).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, extra


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

    # -- shared with gateway.transport.http_protocol -----------------------------------------

    def too_large(self) -> Reply:
        status, body, headers = reply(413, {"detail": f"request body larger than "
                                                      f"{self.max_body_bytes} bytes"})  # fmt: skip
        return status, body, headers + _CLOSE

    def check_headers(self, headers: list[tuple[bytes, bytes]]) -> tuple[str | None, Reply | None]:
        """The caller's request id, and the answer to give at once if the headers already
        rule the request out (a declared body over the cap, a malformed length)."""
        request_id = None
        for name, value in headers:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    status, body, extra = reply(400, {"detail": "invalid Content-Length header"})
                    return request_id, (status, body, extra + _CLOSE)
                if declared > self.max_body_bytes:
                    return request_id, self.too_large()
        return request_id, None

    async def answer(self, deployment: str, raw: bytes, request_id: str | None) -> Reply:
        """Predict, with every failure turned into its HTTP answer."""
        service = self._service or self._started_service()
        if service is None:
            return reply(503, {"detail": "the gateway is starting"}, {"Retry-After": "1"})
        try:
            doc = await service.predict(deployment, raw, request_id)
        except Exception as exc:
            answer = problem(exc)
            if answer is None:  # a bug: say so to the caller and in the log, keep serving
                log.exception("predict %s failed", deployment)
                return reply(500, {"detail": "internal server error"})
            return reply(*answer)
        return reply(200, doc)

    # -- ASGI ---------------------------------------------------------------------------------

    async def _predict(self, deployment: str, scope: Scope, receive: Receive, send: Send) -> None:
        request_id, refusal = self.check_headers(scope["headers"])
        if refusal is not None:
            await _send(send, refusal)
            return
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send(send, self.too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        await _send(send, await self.answer(deployment, raw, request_id))

    def _started_service(self) -> PredictionService | None:
        self._service = getattr(self.app.state, "service", None)
        return self._service


async def _send(send: Send, answer: Reply) -> None:
    status, body, extra = answer
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers + extra})
    await send({"type": "http.response.body", "body": body})
