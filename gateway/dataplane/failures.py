"""The data plane's failures, one type each, and the one answer each gets (``problem_of``),
so that every transport answers a failure alike."""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import redis
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisClusterException

from gateway.dataplane.mailbox import Answer, DuplicateRequest
from gateway.problems import RETRY, Problem, unavailable
from rendezvous.bus.failures import REDIS_FAILURES, refused_for_a_while

log = logging.getLogger(__name__)


class UnknownDeployment(LookupError):
    pass


class InvalidDeploymentName(UnknownDeployment):
    """A path names a deployment by a name that can never be one (``names.check_name``): 422
    naming the rule on every ``/v1``, ``/dashboard`` and ``/admin`` route; the Open Inference
    Protocol's routes answer it as an unknown model (404)."""


class UnknownVersion(UnknownDeployment):
    """A request names a model version that holds no role of the deployment (404)."""


class Unavailable(RuntimeError):
    """Redis cannot take the request now; the caller may retry."""

    def __init__(self, message: str, *, request_id_taken: str | None = None):
        super().__init__(message)
        self.request_id_taken = request_id_taken
        """The caller's own request id, which stays taken: a retry needs a new one."""


class Overloaded(RuntimeError):
    """This gateway already holds as many requests as it may (answer 429 at once)."""


class Backlogged(RuntimeError):
    """The deployment's input stream is too far behind (answer 503 at once)."""


class NoAnswer(TimeoutError):
    def __init__(self, request_id: str, answer: Answer):
        super().__init__(answer.reason)
        self.request_id = request_id
        self.answer = answer


STORAGE_REFUSALS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""A write the gateway's own disk refused: full, over quota, or read-only. An upload's
files (``RDV_DATA_DIR``) and its dry run's (the temporary folder) met it as a 500."""


def storage_refused(exc: BaseException) -> str | None:
    """What to tell the caller when ``exc`` is this host's disk refusing a write, else None
    (the path, which the caller has no use for, goes to the log)."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_REFUSALS:
        return None
    log.warning("a write on the gateway's disk was refused: %s", exc)
    return (f"the gateway cannot write to its disk ({os.strerror(exc.errno or 0)}): give its "
            "data folder (RDV_DATA_DIR) and temporary folder room, or write access back, then "
            "send this again")  # fmt: skip


def passing(exc: BaseException) -> bool:
    """A refusal that passes: this process or the deployment is busy, or Redis is down or
    refusing for a moment (503 and 429 tell a caller to retry; an async job's run is tried
    again). A timeout of the models (``NoAnswer``) is an answer, not one of them."""
    if isinstance(exc, NoAnswer):
        return False
    return isinstance(exc, (Overloaded, Backlogged, Unavailable, *REDIS_FAILURES))


MAX_FAULTS = 10
"""A 422 names at most this many faults, then how many more there were: a body of 50,000
unknown feature names once made a 5.4 MB answer that held the event loop for 2 s."""
MAX_TEXT = 200
"""Longest message, location part or echoed input, in characters."""


def bounded_faults(errors: Sequence[Any]) -> list[Any]:
    """The first ``MAX_FAULTS`` faults, each cut to size, and a last entry counting the rest
    (a few KB at most, whatever the request)."""
    shown = [_trimmed(e) for e in errors[:MAX_FAULTS]]
    if len(errors) > MAX_FAULTS:
        more = len(errors) - MAX_FAULTS
        shown.append({"type": "more_faults", "loc": ["body"],
                      "msg": f"{more} more faults not shown ({len(errors)} in all)"})  # fmt: skip
    return shown


def _trimmed(error: Any) -> Any:
    if not isinstance(error, dict):
        return _cut(error)
    out = {k: v for k, v in error.items() if k in ("type", "loc", "msg", "input")}
    out["loc"] = [_cut(part) for part in list(error.get("loc", ()))[:8]]
    if "msg" in out:
        out["msg"] = _cut(out["msg"])
    if isinstance(out.get("input"), list | tuple | dict):
        del out["input"]  # a structure is not echoed back; null read as the value sent
    elif "input" in out:
        text = _cut(out["input"])
        out["input"] = text if isinstance(text, str | int | float | bool) or text is None else None
    bounds = error.get("ctx")
    if isinstance(bounds, dict):  # the bound a number broke, for a program to read (ge, le)
        kept = {k: v for k, v in list(bounds.items())[:4]
                if isinstance(k, str) and type(v) in (int, float)}  # fmt: skip
        if kept:
            out["ctx"] = kept
    return jsonable_encoder(out)


def _cut(value: Any) -> Any:
    if isinstance(value, str | bytes) and len(value) > MAX_TEXT:
        value = value[:MAX_TEXT]
        return (value.decode("utf-8", "replace") if isinstance(value, bytes) else value) + "..."
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple | dict):
        return None  # a structure is not echoed back: its location says which it is
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no such number (a UTF-16 body may spell one: json.loads reads it); named.
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def problem_of(exc: BaseException) -> Problem | None:
    """The answer to ``exc``, or None for a failure that is a bug (a 500)."""
    if isinstance(exc, RequestValidationError):
        return Problem(422, bounded_faults(exc.errors()))
    if isinstance(exc, InvalidDeploymentName):
        return Problem(422, str(exc))
    if isinstance(exc, UnknownDeployment):
        return Problem(404, str(exc))
    if isinstance(exc, DuplicateRequest):
        return Problem(409, str(exc))
    if isinstance(exc, Overloaded):
        return Problem(429, str(exc), headers=RETRY)
    if isinstance(exc, Unavailable) and exc.request_id_taken is not None:
        taken = {"request_id": exc.request_id_taken, "request_id_taken": True}
        return Problem(503, str(exc), taken, headers=RETRY)
    if isinstance(exc, Unavailable | Backlogged):
        return unavailable(str(exc))
    if refused := refused_for_a_while(exc):
        return unavailable(refused)
    if isinstance(exc, redis.RedisError | RedisClusterException):
        return unavailable(f"Redis is unavailable: {type(exc).__name__}")
    if isinstance(exc, NoAnswer):
        answer = exc.answer
        if answer.failed:
            detail = f"every model that may answer failed on the request: {answer.reason}"
            return Problem(502, detail, {"request_id": exc.request_id})
        detail = f"no model answered within {answer.elapsed_ms:.0f} ms: {answer.reason}"
        return Problem(504, detail, {"request_id": exc.request_id})
    if isinstance(exc, TimeoutError):
        return unavailable("Redis did not answer in time")
    if refused_here := storage_refused(exc):
        return Problem(507, refused_here)
    return None


HANDLED: tuple[type[Exception], ...] = (
    UnknownDeployment,
    Unavailable,
    redis.RedisError,
    RedisClusterException,
    TimeoutError,
    Overloaded,
    Backlogged,
    DuplicateRequest,
    NoAnswer,
    OSError,  # those of ``STORAGE_REFUSALS`` (any other is still a 500)
)
"""The failures ``problem_of`` answers, for the framework's exception handlers."""


__all__ = [
    "HANDLED",
    "Backlogged",
    "DuplicateRequest",
    "InvalidDeploymentName",
    "NoAnswer",
    "Overloaded",
    "Unavailable",
    "UnknownDeployment",
    "problem_of",
]
