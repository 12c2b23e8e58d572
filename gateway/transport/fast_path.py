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

A gateway process at its in-flight bound refuses a predict from its head alone (``overloaded``):
no body read, parsed or validated for an answer that does not depend on it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.dataplane.answers import answer_json
from gateway.dataplane.failures import Overloaded, problem_of
from gateway.dataplane.service import PredictionService
from gateway.dataplane.validation import several_request_ids
from gateway.problems import RETRY, Problem, compressed, unavailable
from gateway.transport.limits import BodyCap, Reply, send_reply, style_of
from rendezvous.names import NAME_RE

log = logging.getLogger(__name__)

PREDICT_PATH = re.compile(rf"/v1/deployments/({NAME_RE})/predict")
"""A predict path (ASGI: decoded, no query string), named as a Redis key names a deployment."""

SHUTTING_DOWN = Problem(503, "the gateway is shutting down", headers=RETRY, close=True)


def ok(doc: dict[str, Any]) -> Reply:
    """The answer, or a 502 naming the model when it answered a non-finite number."""
    try:
        return 200, answer_json(doc), []
    except ValueError:
        model = doc.get("model") or {}
        detail = (
            f"model {model.get('name')} v{model.get('version')} ({model.get('role')}) answered "
            "a non-finite probability"
        )
        return Problem(502, detail).reply()


def _refused_ids(headers: list[tuple[bytes, bytes]]) -> Reply:
    problem = problem_of(several_request_ids(sum(n == b"x-request-id" for n, _ in headers)))
    assert problem is not None
    return problem.reply()


def unprintable_path(path: str) -> Reply:
    """400 for a path that, percent-decoded, holds a control character: the routes' patterns
    end in ``$``, which matches before a final newline, so ``/healthz%0A`` was ``/healthz``,
    ``.../infer%0a`` scored and archived the request, and an entity key ending in ``%0A``
    deleted the entity without it (found by a helper's fuzzing)."""
    at = next(i for i, ch in enumerate(path) if not ch.isprintable())
    detail = (
        f"the path holds a character that is not printable ({path[at]!r} at {at}, "
        "percent-decoded: a control, format or separator character)"
    )
    return Problem(400, detail).reply(style_of(path))


class PredictFastPath:
    """Serves predict; hands everything else to ``app``, whose lifespan builds the service."""

    def __init__(self, app: FastAPI, max_body_bytes: int):
        self.app = app
        self.cap = BodyCap(max_body_bytes)
        self._service: PredictionService | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if scope["method"] == "POST" and (match := PREDICT_PATH.fullmatch(path)) is not None:
                await self._predict(match.group(1), scope, receive, send)
                return
            if not path.isprintable():
                await send_reply(send, unprintable_path(path))
                return
        await self.app(scope, receive, send)

    async def _predict(self, deployment: str, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        service = self._service or self._started_service()
        refused = self.cap.refuse_headers(headers)
        if refused is not None:  # a declared body over the cap, a malformed length
            count_invalid(service, deployment)
            await send_reply(send, refused.reply())
            return
        if service is not None and service.full():
            await send_reply(send, overloaded(service, deployment))
            return
        request_id = None
        for name, value in headers:
            if name == b"x-request-id":
                if request_id is not None:  # given twice: which one names the request?
                    count_invalid(service, deployment)
                    await send_reply(send, _refused_ids(headers))
                    return
                request_id = value.decode("latin-1")
            elif name == b"content-encoding" and (refused := compressed(value)) is not None:
                count_invalid(service, deployment)
                await send_reply(send, refused.reply())
                return
        if service is not None:
            service.reading += 1  # held from its head (``reading_body``, inline: a hot path)
            service.held_changed()
        try:
            raw = await self._body(receive)
        finally:
            if service is not None:
                service.reading -= 1
                service.held_changed()
        if raw is None:  # the caller went away
            return
        if self.cap.exceeded(len(raw)):
            count_invalid(service, deployment)
            await send_reply(send, self.cap.too_large().reply())
            return
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

    async def _body(self, receive: Receive) -> bytes | None:
        """The request's body (None: the caller went away); read no further than one chunk
        past the cap, which the caller then checks."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if self.cap.exceeded(size) or not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _started_service(self) -> PredictionService | None:
        self._service = getattr(self.app.state, "service", None)
        return self._service


def count_invalid(service: PredictionService | None, deployment: str) -> None:
    """A body refused before it reached the service (413, 415) is bad input all the same:
    counted as the service counts its 422s (``rdv_requests_total{outcome="invalid"}``)."""
    if service is not None:
        service.metrics.request_done(_label(service, deployment), "invalid", None)


OTHER_PREDICTS = re.compile(
    r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer|/v1/deployments/([^/]+)/jobs"
)
"""The other ways into predict (Open Inference Protocol infer, job submission), whose bodies
the framework's body cap (``BodySizeLimit``) refuses."""


def refused_body_counter(app: FastAPI) -> Callable[[Scope], None]:
    """``BodySizeLimit``'s ``on_refused``: a 413 on another way into predict counted as the
    fast path counts its own."""

    def count(scope: Scope) -> None:
        match = OTHER_PREDICTS.fullmatch(scope.get("path", ""))
        if scope.get("method") == "POST" and match is not None:
            count_invalid(getattr(app.state, "service", None), match.group(1) or match.group(2))

    return count


def _label(service: PredictionService, deployment: str) -> str | None:
    """The deployment as a metric label: None (``_unknown``) for a name that does not exist,
    so that a caller cannot make new series."""
    return deployment if deployment in service.deployments.deployments else None


def overloaded(service: PredictionService, deployment: str) -> Reply:
    """The 429 of a gateway process at its in-flight bound, from the request's head alone.

    The service refuses the same way after validation (``PredictionService._predict``, still
    the rule for a request that passes here and finds the bound reached meanwhile); here the
    body is never read, parsed or validated (under 5,000 connections a 429 took a median of
    483 ms while every refused body was parsed). Counted as the service counts a refusal.

    The connection stays open (keep-alive) and the body is not drained here: once an answer
    is complete, uvicorn's protocol parses and drops the rest of the request's body as it
    arrives (``HttpToolsProtocol.on_body``), so the next request on the connection is read
    where it starts, at no cost to the app. That is cheaper than draining it through ASGI (a
    ``receive`` per chunk) and than ``Connection: close`` (under overload every client would
    reconnect to be refused again, and closing a socket with unread bytes resets it, which
    can lose the answer). A declared length over the cap is refused 413 first, so what is
    dropped is at most ``RDV_MAX_BODY_BYTES``; a chunked body is dropped for at most
    ``RDV_BODY_TIMEOUT_S`` (the HTTP guard's 408), as on any route that answers without
    reading. A client that waits for ``100 Continue`` gets an answer that closes the
    connection (``gateway.transport.expect_continue``).
    """
    service.metrics.request_done(_label(service, deployment), "rejected", None)
    return _refusal(service.held)


def overload_problem(service: PredictionService, deployment: str) -> Problem:
    """``overloaded`` for the framework's routes (Open Inference Protocol infer, job submit):
    the same 429 from the head, counted the same way, as a ``Problem``."""
    service.metrics.request_done(_label(service, deployment), "rejected", None)
    return _overload(service.held)


def _overload(held: int) -> Problem:
    problem = problem_of(Overloaded(f"this gateway already holds {held} requests; retry later"))
    assert problem is not None
    return problem


@functools.lru_cache(maxsize=8)
def _refusal(in_flight: int) -> Reply:
    """The 429 at this many requests in flight, built once (at the bound it is always the
    same); shared, so never changed in place."""
    return _overload(in_flight).reply()


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
