"""The data plane's failures, one type each, and the one answer each gets (``problem_of``),
so that every transport answers a failure alike."""

from __future__ import annotations

import redis
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError

from gateway.dataplane.matcher import Answer, DuplicateRequest
from gateway.problems import RETRY, Problem, unavailable


class UnknownDeployment(LookupError):
    pass


class Unavailable(RuntimeError):
    """Redis cannot take the request now; the caller may retry."""


class Overloaded(RuntimeError):
    """This gateway already holds as many requests as it may (answer 429 at once)."""


class Backlogged(RuntimeError):
    """The deployment's input stream is too far behind (answer 503 at once)."""


class NoAnswer(TimeoutError):
    def __init__(self, request_id: str, answer: Answer):
        super().__init__(answer.reason)
        self.request_id = request_id
        self.answer = answer


def problem_of(exc: BaseException) -> Problem | None:
    """The answer to ``exc``, or None for a failure that is a bug (a 500)."""
    if isinstance(exc, RequestValidationError):
        return Problem(422, jsonable_encoder(exc.errors()))
    if isinstance(exc, UnknownDeployment):
        return Problem(404, str(exc))
    if isinstance(exc, DuplicateRequest):
        return Problem(409, str(exc))
    if isinstance(exc, Overloaded):
        return Problem(429, str(exc), headers=RETRY)
    if isinstance(exc, Unavailable | Backlogged):
        return unavailable(str(exc))
    if isinstance(exc, redis.RedisError):
        return unavailable(f"Redis is unavailable: {type(exc).__name__}")
    if isinstance(exc, NoAnswer):
        answer = exc.answer
        detail = f"no model answered within {answer.elapsed_ms:.0f} ms: {answer.reason}"
        return Problem(504, detail, {"request_id": exc.request_id})
    if isinstance(exc, TimeoutError):
        return unavailable("Redis did not answer in time")
    return None


HANDLED: tuple[type[Exception], ...] = (
    UnknownDeployment,
    Unavailable,
    redis.RedisError,
    TimeoutError,
    Overloaded,
    Backlogged,
    DuplicateRequest,
    NoAnswer,
)
"""The failures ``problem_of`` answers, for the framework's exception handlers."""


__all__ = [
    "HANDLED",
    "Backlogged",
    "DuplicateRequest",
    "NoAnswer",
    "Overloaded",
    "Unavailable",
    "UnknownDeployment",
    "problem_of",
]
