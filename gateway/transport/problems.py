"""One mapping from the data plane's failures to HTTP answers, shared by the FastAPI
handlers and the predict fast path, so both answer a failure the same way."""

from __future__ import annotations

from typing import Any

import redis
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError

from gateway.dataplane.failures import (
    Backlogged,
    DuplicateRequest,
    NoAnswer,
    Overloaded,
    Unavailable,
    UnknownDeployment,
)

Problem = tuple[int, dict[str, Any], dict[str, str]]
"""(status, JSON body, extra headers)."""

RETRY = {"Retry-After": "1"}

HANDLED: tuple[type[BaseException], ...] = (
    UnknownDeployment,
    Unavailable,
    redis.RedisError,
    TimeoutError,
    Overloaded,
    Backlogged,
    DuplicateRequest,
    NoAnswer,
)


def problem(exc: BaseException) -> Problem | None:
    """The answer to ``exc``, or None for a failure that is a bug (a 500)."""
    if isinstance(exc, RequestValidationError):
        return 422, {"detail": jsonable_encoder(exc.errors())}, {}
    if isinstance(exc, UnknownDeployment):
        return 404, {"detail": str(exc)}, {}
    if isinstance(exc, DuplicateRequest):
        return 409, {"detail": str(exc)}, {}
    if isinstance(exc, Overloaded):
        return 429, {"detail": str(exc)}, RETRY
    if isinstance(exc, Unavailable | Backlogged):
        return 503, {"detail": str(exc)}, RETRY
    if isinstance(exc, redis.RedisError):
        return 503, {"detail": f"Redis is unavailable: {type(exc).__name__}"}, RETRY
    if isinstance(exc, NoAnswer):
        answer = exc.answer
        detail = f"no model answered within {answer.elapsed_ms:.0f} ms: {answer.reason}"
        return 504, {"detail": detail, "request_id": exc.request_id}, {}
    if isinstance(exc, TimeoutError):
        return 503, {"detail": "Redis did not answer in time"}, RETRY
    return None
