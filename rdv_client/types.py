"""What the gateway answers, as typed values, and its refusals as one exception."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def said(detail: Any) -> str:
    """A detail in words: a 422's list of faults as ``instances[0]: ...; ...`` (the gateway
    renders them so for the command line; the client imports nothing of the gateway)."""
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for fault in detail:
        if not isinstance(fault, Mapping):
            parts.append(str(fault))
            continue
        loc = [p for i, p in enumerate(fault.get("loc") or ()) if i or p != "body"]
        where = ""
        for part in loc:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        parts.append(f"{where}: {fault.get('msg')}" if where else str(fault.get("msg")))
    return "; ".join(parts)


class RdvError(Exception):
    """A refusal or failure the gateway answered with: ``status`` and its ``detail``;
    ``retry_after`` (seconds) when the refusal is momentary (429, 503); ``body``, the whole
    JSON answer (it may say more than the detail); ``tries``, how many times the client sent
    the call (more than once: its retries ended here)."""

    def __init__(
        self,
        status: int,
        detail: Any,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
        tries: int = 1,
    ):
        after = f" (after {tries} tries)" if tries > 1 else ""
        super().__init__(f"{status}: {said(detail)}{after}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.body: Mapping[str, Any] = body or {}
        self.tries = tries

    def __reduce__(self) -> tuple[Any, ...]:
        # As it was made, so that it crosses a process pool (it broke the pool instead).
        args = (self.status, self.detail, self.retry_after, dict(self.body), self.tries)
        return (RdvError, args)


class JobExists(RdvError):
    """A submit's 409: its request id already took a job, ``job_id`` at ``location`` (a
    caller that lost the first 202 finds its job here)."""

    def __init__(self, status: int, detail: Any, body: Mapping[str, Any], tries: int = 1):
        super().__init__(status, detail, None, body, tries)
        self.job_id = str(body["id"])
        self.location = str(body["location"])

    def __reduce__(self) -> tuple[Any, ...]:
        return (JobExists, (self.status, self.detail, dict(self.body), self.tries))


class GatewayUnreachable(Exception):
    """No answer from the gateway: it could not be reached, or did not answer within the
    client's timeout (the cause is the httpx error), after the client's retries where it may
    send the call again (``rdv_client.retries``). Whether a predict or a submit was taken
    is unknown: send it again with the same ``request_id``, and a 409 says it was."""


@dataclass(frozen=True)
class ModelAnswer:
    """Which model answered: its name, version and role (real, a fallback, a split)."""

    name: str
    version: int
    role: str


@dataclass(frozen=True)
class Row:
    label: Any
    probabilities: Mapping[str, float]


@dataclass(frozen=True)
class Prediction:
    request_id: str
    model: ModelAnswer
    rows: list[Row]
    latency_ms: float
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def label(self) -> Any:
        """The first row's label (a one-row request's answer)."""
        return self.rows[0].label

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Prediction:
        model = doc["model"]
        return cls(
            request_id=str(doc["request_id"]),
            model=ModelAnswer(str(model["name"]), int(model["version"]), str(model["role"])),
            rows=[Row(p["label"], dict(p["probabilities"])) for p in doc["predictions"]],
            latency_ms=float(doc.get("latency_ms", 0.0)),
            raw=doc,
        )


@dataclass(frozen=True)
class Job:
    """An async job: ``status`` pending, done or failed; ``result`` once done."""

    id: str
    status: str
    result: Prediction | None = None
    error: Mapping[str, Any] | None = None
    """A failed job's ``{"status", "detail"}`` (what predict would have answered), or
    ``{"detail", "cancelled": true}``."""
    location: str | None = None
    request_id: str | None = None
    """The request id its predict carries: the caller's, else the job id."""

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Job:
        result = doc.get("result")
        return cls(
            id=str(doc["id"]),
            status=str(doc.get("status", "pending")),
            result=Prediction.from_json(result) if result else None,
            error=doc.get("error"),
            location=doc.get("location"),
            request_id=doc.get("request_id"),
        )
