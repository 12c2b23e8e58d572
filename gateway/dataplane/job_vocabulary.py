"""The words every part of the job service shares, with no Redis of its own: a job's states
and id, what callers get (an acceptance, a view, the refusals), the documents a run's end writes,
and the pace of the blocking reads that the runner and the long polls both make."""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from gateway.dataplane.answers import answer_json
from gateway.dataplane.failures import Unavailable, problem_of
from rendezvous import names

log = logging.getLogger(__name__)

PENDING, DONE, FAILED = "pending", "done", "failed"
BLOCK_MS = 5000
"""How long a blocking read of the jobs or done stream waits. A new entry ends the wait at
once, so this bounds only how often an idle deployment's readers wake (each process reads every
deployment's jobs stream: twenty deployments at 1 s were 40 round trips a second on an idle
host) and how long a hung Redis goes unnoticed (the blocking client's timeout outlasts it)."""
BACKOFF_MAX_S = 2.0
"""The longest pause between two tries of a Redis read or write that failed."""


# -- ids ----------------------------------------------------------------------------------------


def new_job_id(now_ms: int | None = None) -> str:
    """Its creation time (epoch ms) and 80 random bits, in hex."""
    created = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{created:x}-{secrets.token_hex(10)}"


def created_ms(job_id: str) -> int | None:
    """The creation time a job id carries; None for what is no job id."""
    if not isinstance(job_id, str) or not names.JOB_ID_PATTERN.fullmatch(job_id):
        return None
    return int(job_id.split("-", 1)[0], 16)


# -- what callers get ---------------------------------------------------------------------------


class JobNotFound(LookupError):
    def __init__(self, job_id: str, detail: str, *, expired: bool):
        super().__init__(detail)
        self.job_id = job_id
        self.expired = expired


class JobConflict(Exception):
    """The request id already took a job (``job_id``), or the job already ended."""

    def __init__(self, detail: str, job_id: str):
        super().__init__(detail)
        self.job_id = job_id


class MaybeAccepted(Unavailable):
    """Redis failed under a submit's accept script after it may have run (its reply lost to a
    stall or a dropped connection): the job may exist under ``job_id``, so the caller is told
    it, to poll it before sending the body again (a 404 that says it never was: not taken)."""

    def __init__(self, detail: str, job_id: str):
        super().__init__(detail)
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    request_id: str
    """The request id its predict carries: the caller's ``X-Request-Id``, else the job id."""


@dataclass(frozen=True, slots=True)
class JobView:
    id: str
    status: str
    request_id: str
    """The request id its predict carries (the caller's ``X-Request-Id``, else the job id)."""
    result: bytes | None = None
    """The predict's answer as JSON, exactly as a predict would have answered it."""
    error: bytes | None = None
    """Why it failed, as JSON: ``{"status", "detail", ...}`` (the answer a predict would have
    had), or ``{"detail", "cancelled": true}``."""

    def to_json(self) -> bytes:
        head = json.dumps({"id": self.id, "status": self.status, "request_id": self.request_id},
                          separators=(",", ":"))  # fmt: skip
        out = head[:-1].encode()
        if self.result is not None:
            out += b',"result":' + self.result
        if self.error is not None:
            out += b',"error":' + self.error
        return out + b"}"


def compact_json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def error_doc(exc: BaseException) -> bytes:
    """A run's failure as the answer its predict would have had."""
    problem = problem_of(exc)
    if problem is None:
        log.error("job failed", exc_info=exc)
        return compact_json({"status": 500, "detail": "internal server error"})
    return json.dumps(
        {"status": problem.status, "detail": problem.detail, **problem.extra},
        separators=(",", ":"),
        default=str,
    ).encode()


def answer_doc(answer: dict[str, Any]) -> tuple[str, bytes]:
    """(status, JSON) of a predict's answer; a non-finite number fails as predict's 502."""
    try:
        return DONE, answer_json(answer)
    except ValueError:
        model = answer.get("model") or {}
        detail = (
            f"model {model.get('name')} v{model.get('version')} ({model.get('role')}) answered "
            "a non-finite probability"
        )
        return FAILED, compact_json({"status": 502, "detail": detail})


__all__ = [
    "BACKOFF_MAX_S",
    "BLOCK_MS",
    "DONE",
    "FAILED",
    "PENDING",
    "Accepted",
    "JobConflict",
    "JobNotFound",
    "JobView",
    "MaybeAccepted",
    "answer_doc",
    "compact_json",
    "created_ms",
    "error_doc",
    "new_job_id",
]
