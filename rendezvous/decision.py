"""The decision record: one per request, written after the grace period.

It holds every bin's output and latency, the role that answered (or the timeout), which bins
never answered, and the real-vs-canary divergence. It is the raw material of drift tracking.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rendezvous.divergence import divergence
from rendezvous.envelope import ModelResult
from rendezvous.names import CANARY, REAL

FIELD = b"d"


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
        out["probabilities"] = [[round(float(p), 6) for p in row] for row in result.probabilities]
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
) -> dict[str, Any]:
    """``outcome`` is ``real``, ``fallback`` or ``timeout``; ``chosen_role`` is None on timeout."""
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
    }
    real, canary = results.get(REAL), results.get(CANARY)
    if real is not None and canary is not None and real.ok and canary.ok:
        try:
            record["divergence"] = divergence(
                real.labels, real.probabilities, canary.labels, canary.probabilities
            ).to_dict()
            record["divergence"]["pair"] = [
                f"{real.model}:{real.version}",
                f"{canary.model}:{canary.version}",
            ]
        except ValueError as exc:
            record["divergence_error"] = str(exc)
    return record


def encode_decision(record: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {FIELD: json.dumps(record, separators=(",", ":")).encode()}


def decode_decision(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fields[FIELD])
    return doc
