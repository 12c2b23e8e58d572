"""Promotion evidence: how a non-real role has fared against real, over decision records.

Pure: decision records in, a ``ShadowRecord`` out. The admin plane reads the records from the
decisions stream and gates a promotion on ``ShadowRecord.shortfalls``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from rendezvous.decision import DecisionRecord


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    """One role's record over a window of decision records, counting only what its current
    model version did (records of an earlier holder of the role are skipped)."""

    role: str
    model: str | None
    version: int | None
    since_ms: float | None
    """Records of requests that started before this are not counted (when the role got its
    current version)."""
    requests: int
    """Requests the role was expected to score."""
    scored: int
    """Requests it scored (correct version, no error) and real scored too: the evidence."""
    misses: int
    """Requests it never answered within the grace period."""
    starting: int
    """Requests it missed before its first result since it got its version: its worker was
    starting (about a second after a role is added), not counted in ``requests`` or
    ``misses``. Only when the window reaches back to that start: misses at the window's edge
    are misses."""
    errors: int
    answered: int
    """Requests whose caller got this role's answer (split or fallback)."""
    rows: int
    disagreements: int
    disagreement_rate: float | None
    """Share of rows whose label differs from real's."""
    js_mean: float | None
    """Mean Jensen-Shannon distance from real's probabilities."""
    abs_diff_mean: float | None
    """Mean |difference| of the positive-class probability (binary models)."""
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    """When its result reached the rendezvous, from the request's start."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def shortfalls(
        self, min_shadow_requests: int | None, max_disagreement: float | None
    ) -> list[str]:
        """Why this record is not enough evidence to promote (empty: it is)."""
        out = []
        if min_shadow_requests and self.scored < min_shadow_requests:
            out.append(
                f"{self.role} scored {self.scored} requests beside real, "
                f"needs at least {min_shadow_requests}"
            )
        if max_disagreement is not None:
            if self.disagreement_rate is None:
                out.append(f"{self.role} has no divergence figures against real yet")
            elif self.disagreement_rate > max_disagreement:
                out.append(
                    f"{self.role} disagrees with real on {self.disagreement_rate:.4f} of rows, "
                    f"above the allowed {max_disagreement}"
                )
        return out


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def _first_result_ms(
    records: list[DecisionRecord],
    role: str,
    model: str | None,
    version: int | None,
    since_ms: float | None,
) -> float | None:
    """When the role's first result since ``since_ms`` came, if the records reach back to
    ``since_ms`` (one of them is older): the misses before it were its worker starting."""
    if since_ms is None or not any(rec.ts_ms < since_ms for rec in records):
        return None
    times = [rec.ts_ms for rec in records
             if rec.ts_ms >= since_ms and (out := rec.outputs.get(role)) is not None
             and (model is None or out.model == model)
             and (version is None or out.version == version)]  # fmt: skip
    return min(times) if times else None


def shadow_record(
    records: Iterable[DecisionRecord],
    role: str,
    *,
    model: str | None = None,
    version: int | None = None,
    since_ms: float | None = None,
) -> ShadowRecord:
    """Summarise ``role`` over decision records. With ``model``/``version``, only outputs of
    that model version count; with ``since_ms``, only requests that started after it. A
    request's record written twice (the decisions stream is at least once: an append sent
    again across a Redis stall) counts once."""
    requests = scored = misses = starting = errors = answered = rows = disagreements = 0
    js: list[float] = []
    abs_diff: list[float] = []
    latencies: list[float] = []
    records = list({rec.request_id: rec for rec in records}.values())
    first_ms = _first_result_ms(records, role, model, version, since_ms)
    for rec in records:
        if since_ms is not None and rec.ts_ms < since_ms:
            continue
        out = rec.outputs.get(role)
        if out is None:
            if role in rec.missing:
                if first_ms is not None and rec.ts_ms < first_ms:
                    starting += 1
                    continue
                requests += 1
                misses += 1
            continue
        if (model is not None and out.model != model) or (
            version is not None and out.version != version
        ):
            continue
        requests += 1
        if rec.chosen_role == role:
            answered += 1
        if out.arrived_ms is not None:
            latencies.append(out.arrived_ms)
        if out.error is not None:
            errors += 1
            continue
        div = rec.divergences.get(role)
        if div is None:
            continue
        scored += 1
        rows += div.rows
        disagreements += div.disagreements
        js.append(div.js_mean)
        if div.abs_diff_mean is not None:
            abs_diff.append(div.abs_diff_mean)
    return ShadowRecord(
        role=role,
        model=model,
        version=version,
        since_ms=since_ms,
        requests=requests,
        scored=scored,
        misses=misses,
        starting=starting,
        errors=errors,
        answered=answered,
        rows=rows,
        disagreements=disagreements,
        disagreement_rate=round(disagreements / rows, 6) if rows else None,
        js_mean=round(float(np.mean(js)), 6) if js else None,
        abs_diff_mean=round(float(np.mean(abs_diff)), 6) if abs_diff else None,
        latency_p50_ms=_percentile(latencies, 50),
        latency_p99_ms=_percentile(latencies, 99),
    )
