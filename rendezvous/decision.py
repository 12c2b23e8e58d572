"""The decision record: one per request, written after the grace period.

It holds every bin's output and latency, the role that answered (or the timeout), which bins
never answered, the split draw when the deployment has an A/B split, and the divergence of
every other bin from real (``divergences``; ``divergence`` is the real-vs-canary one, kept on
its own because it is the drift signal). It is the raw material of drift tracking and of the
shadow records that gate a promotion.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

from rendezvous.divergence import divergence
from rendezvous.envelope import ModelResult
from rendezvous.names import CANARY, REAL
from rendezvous.schedule import Schedule

FIELD = b"m"
"""The stream field of a record: one msgpack map (a fifth of JSON's encoding time on the
gateway's hot path, four fifths of its size in Redis)."""
JSON_FIELD = b"d"
"""Records written before msgpack: one JSON object. Still read."""


def _output(result: ModelResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": result.model,
        "version": result.version,
        "model_latency_ms": round(result.model_latency_ms, 4),
        "queue_ms": round(result.queue_ms, 4),
        "arrived_ms": result.extra.get("arrived_ms"),
    }
    if result.ok:
        out["labels"] = result.labels
        rows = result.probabilities.tolist()  # Python floats first: rounding numpy scalars is slow
        out["probabilities"] = [[round(p, 6) for p in row] for row in rows]
    else:
        out["error"] = result.error
    return out


def build_decision(
    *,
    request_id: str,
    deployment: str,
    started_ms: float,
    expected_roles: list[str],
    results: Mapping[str, ModelResult],
    chosen_role: str | None,
    outcome: str,
    answered_after_ms: float | None,
    schedule: Schedule | None = None,
) -> dict[str, Any]:
    """``outcome`` is ``real``, ``split``, ``fallback`` or ``timeout``; ``chosen_role`` is None
    on timeout."""
    record: dict[str, Any] = {
        "request_id": request_id,
        "deployment": deployment,
        "ts_ms": started_ms,
        "outcome": outcome,
        "chosen_role": chosen_role,
        "answered_after_ms": answered_after_ms,
        "outputs": {role: _output(r) for role, r in results.items()},
        "missing": [role for role in expected_roles if role not in results],
        "failed": [role for role, r in results.items() if not r.ok],
        "divergence": None,
        "divergences": {},
    }
    if schedule is not None and schedule.splits:
        record["split"] = {
            "seed": schedule.split_seed,
            "draw": schedule.draw,
            "assigned": schedule.primary,
        }
    real = results.get(REAL)
    if real is None or not real.ok:
        return record
    for role, other in results.items():
        if role == REAL or not other.ok:
            continue
        try:
            div = divergence(real.labels, real.probabilities, other.labels, other.probabilities)
        except ValueError as exc:
            record.setdefault("divergence_errors", {})[role] = str(exc)
            continue
        entry = div.to_dict()
        entry["pair"] = [f"{real.model}:{real.version}", f"{other.model}:{other.version}"]
        record["divergences"][role] = entry
    record["divergence"] = record["divergences"].get(CANARY)
    return record


def encode_decision(record: Mapping[str, Any]) -> dict[bytes, bytes]:
    """``divergence`` is stored once, under ``divergences`` (a quarter of a record's bytes,
    and the decisions stream is most of Redis's memory); ``decode_decision`` restores it."""
    divergences = record.get("divergences") or {}
    if record.get("divergence") is not None and record["divergence"] is divergences.get(CANARY):
        record = {k: v for k, v in record.items() if k != "divergence"}
    return {FIELD: msgpack.packb(record, use_bin_type=True)}


def decode_decision(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    blob = fields.get(FIELD)
    if blob is None:
        return json.loads(fields[JSON_FIELD])  # type: ignore[no-any-return]
    doc: dict[str, Any] = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    if "divergence" not in doc:
        doc["divergence"] = (doc.get("divergences") or {}).get(CANARY)
    return doc


# -- shadow records: how a non-real role has fared against real -------------------------------


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


def shadow_record(
    records: Iterable[Mapping[str, Any]],
    role: str,
    *,
    model: str | None = None,
    version: int | None = None,
    since_ms: float | None = None,
) -> ShadowRecord:
    """Summarise ``role`` over decision records. With ``model``/``version``, only outputs of
    that model version count; with ``since_ms``, only requests that started after it."""
    requests = scored = misses = errors = answered = rows = disagreements = 0
    js: list[float] = []
    abs_diff: list[float] = []
    latencies: list[float] = []
    for rec in records:
        if since_ms is not None and float(rec.get("ts_ms", 0)) < since_ms:
            continue
        out = rec.get("outputs", {}).get(role)
        if out is None:
            if role in rec.get("missing", ()):
                requests += 1
                misses += 1
            continue
        if (model is not None and out.get("model") != model) or (
            version is not None and out.get("version") != version
        ):
            continue
        requests += 1
        if rec.get("chosen_role") == role:
            answered += 1
        if out.get("arrived_ms") is not None:
            latencies.append(float(out["arrived_ms"]))
        if "error" in out:
            errors += 1
            continue
        div = (rec.get("divergences") or {}).get(role)
        if div is None and role == CANARY:
            div = rec.get("divergence")
        if div is None:
            continue
        scored += 1
        rows += int(div["rows"])
        disagreements += int(div["disagreements"])
        js.append(float(div["js_mean"]))
        if div.get("abs_diff_mean") is not None:
            abs_diff.append(float(div["abs_diff_mean"]))
    return ShadowRecord(
        role=role,
        model=model,
        version=version,
        since_ms=since_ms,
        requests=requests,
        scored=scored,
        misses=misses,
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
