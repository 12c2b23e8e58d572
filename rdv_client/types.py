"""What the gateway answers, as typed values, and its refusals as one exception."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class RdvError(Exception):
    """A refusal or failure the gateway answered with: ``status`` and its ``detail``;
    ``retry_after`` (seconds) when the refusal is momentary (429, 503)."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


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
        )
