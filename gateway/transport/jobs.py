"""Async jobs over HTTP: submit a predict, collect its answer later from any gateway (issue 17).

``POST /v1/deployments/{deployment}/jobs`` takes a predict's body (and its ``X-Request-Id``)
and answers 202 with the job's ``id`` and ``location``; ``GET`` on the location answers the
job (``?wait_ms=`` long-polls), ``DELETE`` cancels it. The work is
``gateway.dataplane.jobs.JobService``'s; these routes translate.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from gateway.dataplane.failures import problem_of
from gateway.dataplane.job_vocabulary import (
    BLOCK_MS,
    JobConflict,
    JobNotFound,
    JobView,
    MaybeAccepted,
)
from gateway.dataplane.jobs import JobService
from gateway.dataplane.validation import PredictRequest, single_request_id
from gateway.problems import Problem, compressed, unavailable
from gateway.settings import Settings
from gateway.transport.fast_path import count_invalid, overload_problem
from rendezvous.bus.connection import connect_async

log = logging.getLogger(__name__)

JOBS_PATH = "/v1/deployments/{deployment}/jobs"
JOB_PATH = JOBS_PATH + "/{job_id}"


def job_location(deployment: str, job_id: str) -> str:
    return f"/v1/deployments/{deployment}/jobs/{job_id}"


def _refusal(deployment: str, exc: Exception) -> Response:
    if isinstance(exc, JobNotFound):
        problem = Problem(404, str(exc), {"id": exc.job_id, "expired": exc.expired})
    elif isinstance(exc, MaybeAccepted):
        where = job_location(deployment, exc.job_id)
        extra = {"id": exc.job_id, "location": where, "may_exist": True}
        problem = Problem(503, str(exc), extra, headers={"Retry-After": "1"})
    elif isinstance(exc, JobConflict):
        where = job_location(deployment, exc.job_id)
        problem = Problem(409, str(exc), {"id": exc.job_id, "location": where})
    else:
        found = problem_of(exc)
        if found is None:
            log.exception("jobs of %s: request failed", deployment)
            found = Problem(500, "internal server error")
        problem = found
    return problem.response()


def _view(view: JobView) -> Response:
    return Response(view.to_json(), 200, media_type="application/json")


def _jobs(request: Request) -> JobService | None:
    return getattr(request.app.state, "jobs", None)


STARTING = unavailable("the gateway is starting")

_JOB_SCHEMA = {
    "type": "object",
    "required": ["id", "status", "request_id"],
    "properties": {
        "id": {"type": "string"},
        "status": {"type": "string", "enum": ["pending", "done", "failed"]},
        "request_id": {"type": "string", "description": "the request id its predict carries"},
        "result": {"type": "object", "description": "the predict's answer"},
        "error": {
            "type": "object",
            "description": "why it failed: {status, detail} or {detail, cancelled}",
        },
    },
}


def mount(app: FastAPI, settings: Settings) -> None:
    """Add the ``/v1/deployments/{deployment}/jobs`` routes to ``app``."""
    max_wait_ms = settings.job_max_wait_ms

    @app.post(
        JOBS_PATH,
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={
            202: {"description": "accepted: the job's id and location (also in Location)"},
            404: {"description": "unknown deployment"},
            409: {"description": "the X-Request-Id was already used (a job's names it)"},
            413: {"description": "body too large"},
            422: {"description": "invalid input; the detail names each field at fault"},
            429: {"description": "this gateway is at its in-flight bound"},
            503: {
                "description": "Redis unavailable, the input stream backlogged or too many "
                "jobs queued"
            },
        },
    )
    async def submit_job(
        deployment: str,
        request: Request,
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Accept a predict to run later: validated as a predict is, so a bad body is a 422
        and never a job. Its result is kept ``RDV_JOB_TTL_S``, and any gateway answers it."""
        jobs = _jobs(request)
        if jobs is None:
            return STARTING.response()
        refused = compressed(request.headers.get("content-encoding", ""))
        if refused is not None:
            count_invalid(jobs.service, deployment)
            return refused.response()
        if jobs.service.full():  # from the head, as predict's (the body never read)
            return overload_problem(jobs.service, deployment).response()
        try:
            with jobs.service.reading_body():
                raw = await request.body()
        except ClientDisconnect:  # the body cap answered 413 already
            return Response(status_code=400)
        try:
            given = single_request_id(request.headers.getlist("x-request-id"))
        except RequestValidationError as exc:
            count_invalid(jobs.service, deployment)  # counted as every refused submit is
            return _refusal(deployment, exc)
        try:
            accepted = await jobs.submit(deployment, raw, given)
        except Exception as exc:
            return _refusal(deployment, exc)
        location = job_location(deployment, accepted.id)
        doc = {"id": accepted.id, "status": "pending", "location": location,
               "request_id": accepted.request_id}  # fmt: skip
        return JSONResponse(doc, status_code=202, headers={"Location": location})

    @app.get(
        JOB_PATH,
        responses={
            200: {"content": {"application/json": {"schema": _JOB_SCHEMA}}},
            404: {
                "description": "unknown deployment, or no such job (the detail says whether "
                "it expired)"
            },
            422: {"description": "wait_ms out of bounds"},
        },
    )
    async def get_job(
        deployment: str,
        job_id: str,
        request: Request,
        wait_ms: int = Query(  # a default, not an annotation: the bound is this mount's
            default=0, ge=0, le=max_wait_ms, description="wait this long at most for the end"
        ),
    ) -> Response:
        """The job: ``pending``, ``done`` (with ``result``, the predict's answer) or ``failed``
        (with ``error``). With ``wait_ms`` the answer comes once the job ended or after that
        long, whichever is first."""
        jobs = _jobs(request)
        if jobs is None:
            return STARTING.response()
        try:
            return _view(await jobs.wait(deployment, job_id, wait_ms))
        except Exception as exc:
            return _refusal(deployment, exc)

    @app.delete(
        JOB_PATH,
        responses={
            200: {"content": {"application/json": {"schema": _JOB_SCHEMA}}},
            404: {"description": "unknown deployment or job"},
            409: {"description": "the job already ended"},
        },
    )
    async def cancel_job(deployment: str, job_id: str, request: Request) -> Response:
        """Cancel a pending job: it ends ``failed`` with ``error.cancelled`` (a run already
        under way finishes, and its answer is dropped)."""
        jobs = _jobs(request)
        if jobs is None:
            return STARTING.response()
        try:
            return _view(await jobs.cancel(deployment, job_id))
        except Exception as exc:
            return _refusal(deployment, exc)


def _end_long_polls_when_asked_to_stop(jobs: JobService) -> None:
    """Chain the server's SIGTERM and SIGINT handlers (uvicorn's, installed before the app
    starts) with ``end_long_polls``: uvicorn waits for the requests in flight, up to its
    graceful-shutdown bound, before the app's shutdown runs, so a long poll held every stop
    10 s and ended in a 500."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers are the main thread's (an app under a test client)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def hook(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(jobs.end_long_polls)
            previous(signum, frame)

        signal.signal(sig, hook)


async def start(app: FastAPI, settings: Settings) -> Callable[[], Awaitable[None]]:
    """Start this process's share of the job work, once ``app.state.service`` and
    ``app.state.redis`` exist; returns the coroutine function that stops it."""
    assert settings.redis_url is not None
    # The blocking reads (jobs and done streams) on a client of their own: they hold none of
    # the request path's connections, and its timeout outlasts their block.
    blocking = await connect_async(
        settings.redis_url,
        timeout_s=settings.redis_timeout_s + BLOCK_MS / 1000,
        max_connections=settings.redis_max_connections,
    )
    jobs = JobService(
        app.state.redis,
        blocking,
        app.state.service,
        ttl_s=settings.job_ttl_s,
        concurrency=settings.job_concurrency,
        rows_in_flight=settings.job_rows_in_flight,
        timeout_ms=settings.job_timeout_ms,
        max_queued=settings.job_max_queued,
        max_held_bytes=settings.job_max_held_bytes,
        claim_idle_ms=settings.job_claim_idle_ms,
    )
    await jobs.start()
    app.state.jobs = jobs
    _end_long_polls_when_asked_to_stop(jobs)

    async def stop() -> None:
        await jobs.stop()
        await blocking.aclose()

    return stop
