"""The settings of the evidence the system gathers about its models, a part of the one
settings object (``gateway.settings``): shadow records and replays, drift and its alerts,
labels and live accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings

from gateway.settings_values import HttpUrlText, OptionalHttpUrlText

if TYPE_CHECKING:  # imported where used: it brings numpy, which ``rdv serve``'s supervisor
    # (a process that only starts and watches the others) has no use for: ~13 MB of its RSS
    from rendezvous.drift_alerts import Thresholds


class EvidenceSettings(BaseSettings):
    """``RDV_SHADOW_*``, ``RDV_REPLAY_*``, ``RDV_DRIFT_*``, alerts, ``RDV_FEEDBACK_*`` and
    live accuracy. Read only as part of ``Settings``, which gives the prefix."""

    shadow_window: int = Field(default=5000, ge=10, le=1_000_000)
    """Latest decision records a shadow record (and the promotion gate) looks at."""

    replay_batch_rows: int = Field(default=256, ge=1, le=65_536)
    """Most rows a replay scores in one onnxruntime call (bounds its memory and how long it
    holds a core at once)."""

    replay_pause_ms: float = Field(default=0.0, ge=0, le=10_000)
    """A replay's pause between batches: leaves the cores to live traffic on a busy gateway."""

    replay_concurrency: int = Field(default=1, ge=1, le=16)
    """Replays one gateway process runs at once (each in a process it spawns, niced by
    ``shadow_nice``); beyond it, 409."""

    drift_interval_s: float = Field(default=5.0, gt=0)
    """The drift monitor evaluates each deployment at least this often, and once 200 new
    requests are in the sketches (by one gateway process at a time); one history point per
    interval. The online detectors judge each process's rows within 50 ms regardless."""

    drift_window_requests: int = Field(default=1000, ge=10)
    """The drift window: the latest this many requests of the current real model..."""

    drift_window_s: float = Field(default=600.0, gt=0)
    """...none older than this."""

    drift_min_requests: int = Field(default=200, ge=1)
    """Default for deployments without their own: below this many requests in the window,
    drift is not judged (no alert raised or cleared)."""

    drift_thresholds: dict[str, float] = {}
    """Default thresholds as JSON, e.g. ``{"score_psi": 0.25}``; a deployment's own (set
    through the admin API) override them."""
    alert_webhooks: list[HttpUrlText] = []
    """URLs that get every drift alert raised and cleared, as Alertmanager's webhook payload
    (JSON list, e.g. ``["http://alerts.internal/hook"]``); retried with backoff, never in the
    way of a request."""

    public_url: OptionalHttpUrlText = ""
    """The gateway's address as people and receivers reach it (``https://rdv.example``):
    alerts then link to the drift report (``generatorURL``). Empty: the links are paths."""

    drift_history: int = Field(default=360, ge=10)
    """Evaluations kept as the drift report's history."""

    drift_sketch_maxlen: int = Field(default=20_000, ge=100)
    """Approximate cap of each deployment's drift-sketch stream (one entry per gateway
    process every 0.25 s)."""

    feedback_retention_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    """How long a request's outputs are kept for a label to be joined to them (the feedback
    route answers 404 past it); 0 turns feedback off."""

    feedback_bucket_s: float = Field(default=3600.0, ge=1)
    """Outcomes are kept in one Redis hash per this much decision time; a whole bucket expires
    (or is pruned) at once. At most ``MAX_FEEDBACK_BUCKETS`` in the retention."""

    feedback_max_mb: float = Field(default=256.0, gt=0)
    """Most Redis memory one deployment's kept outcomes and labels may take (about 190 bytes
    a request, README); past it the oldest buckets are dropped."""

    accuracy_window: int = Field(default=1000, ge=10, le=100_000)
    """Live accuracy is computed over the latest this many labelled requests."""

    labelled_maxlen: int = Field(default=100_000, ge=100)
    """Approximate cap of each deployment's labelled stream (one entry per label given, about
    0.2 KB for a one-row request and two models, 0.36 KB measured with 20-row requests and
    three): what the live accuracy and the promotion gate read."""

    @field_validator("drift_thresholds")
    @classmethod
    def _known_thresholds(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if value:  # the import brings numpy, which the supervisor does without
            from rendezvous.drift_alerts import Thresholds

            Thresholds().merged(value)
            if "min_requests" in value:
                _judgeable(int(value["min_requests"]), info)
        return value

    @field_validator("feedback_bucket_s")
    @classmethod
    def _few_enough_buckets(cls, value: float, info: ValidationInfo) -> float:
        """Every bucket of the retention is a hash and a field of the deployment's outcome
        state that each label looks through: a tiny bucket (1e-9 s) passed, and the gateway's
        outcome writes failed on a list of 10^17 buckets (found by a helper's probe)."""
        retention = info.data.get("feedback_retention_s")
        if isinstance(retention, int | float) and retention / value > MAX_FEEDBACK_BUCKETS:
            raise ValueError(
                f"RDV_FEEDBACK_RETENTION_S={retention:g} would hold "
                f"{retention / value:.0f} buckets; at most {MAX_FEEDBACK_BUCKETS:,}: make the "
                "bucket larger"
            )
        return value

    @field_validator("drift_min_requests")
    @classmethod
    def _judgeable_default(cls, value: int, info: ValidationInfo) -> int:
        _judgeable(value, info)
        return value

    def drift_defaults(self) -> Thresholds:
        """The thresholds of a deployment that has none of its own (ValueError if invalid)."""
        from rendezvous.drift_alerts import Thresholds

        return Thresholds(min_requests=self.drift_min_requests).merged(self.drift_thresholds)


MAX_FEEDBACK_BUCKETS = 10_000
"""Most time buckets ``RDV_FEEDBACK_RETENTION_S`` may span (the default spans 168)."""


def _judgeable(min_requests: int, info: ValidationInfo) -> None:
    """A window of ``drift_window_requests`` can hold ``min_requests``: else drift is never
    judged, and nothing says so."""
    window = info.data.get("drift_window_requests")
    if isinstance(window, int) and min_requests > window:
        raise ValueError(
            f"min_requests {min_requests} is more than the drift window holds "
            f"(RDV_DRIFT_WINDOW_REQUESTS={window}): drift would never be judged"
        )


__all__ = ["EvidenceSettings"]
