"""The replay report's figures: the counters a runner keeps and the report made of them.

Pure accounting, no I/O (``models.replay`` reads, scores and saves). Counters only grow, in
the order of the slice's records, so a replay resumed at a batch boundary adds the same
numbers in the same order as one that never stopped: the same report, float sums included.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from models.archive_slice import Positions, positions_json
from models.replay_store import RUNNING
from rendezvous import names
from rendezvous.divergence import divergence

HISTOGRAM_EDGES = [round(k / 10, 1) for k in range(11)]
"""Bins of the per-request Jensen-Shannon distance to real's output (base 2, in [0, 1])."""


class Given(NamedTuple):
    """What a request got then, from its decision record."""

    role: str | None
    """The role whose answer was given (None: the request timed out)."""
    labels: list[int] | None
    real_labels: list[int] | None
    real_proba: list[list[float]] | None


@dataclass
class Tally:
    """The runner's counters: saved with each checkpoint, the report derived from them."""

    done: int = 0
    """Records of the slice consumed (scored or skipped): where a resume starts."""
    cursor: dict[str, str] = field(default_factory=dict)
    records: int = 0
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    predicted: dict[str, int] = field(default_factory=dict)
    digest: str = ""
    matched: int = 0
    no_answer: int = 0
    given_rows: int = 0
    agreed_rows: int = 0
    by_role: dict[str, list[int]] = field(default_factory=dict)
    real_records: int = 0
    real_rows: int = 0
    real_disagreements: int = 0
    js_sum: float = 0.0
    js_max: float = 0.0
    js_counts: list[int] = field(default_factory=lambda: [0] * 10)
    labeled: int = 0
    correct: int = 0
    given_labeled: int = 0
    given_correct: int = 0
    batches: int = 0
    model_ms_sum: float = 0.0
    model_ms_max: float = 0.0

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Tally:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def report_view(report: dict[str, Any], tally: Tally) -> dict[str, Any]:
    """The report with its figures from ``tally`` (everything else is kept as it is)."""
    t = tally
    return {
        **report,
        "progress": {"done": t.done, "total": report["progress"]["total"], "cursor": t.cursor},
        "records": t.records,
        "rows": t.rows,
        "skipped": t.skipped,
        "predicted": t.predicted,
        "outputs_sha256": t.digest,
        "agreement": {
            "matched_records": t.matched,
            "unmatched_records": t.records - t.matched,
            "timed_out_records": t.no_answer,
            "rows": t.given_rows,
            "agreed_rows": t.agreed_rows,
            "rate": _rate(t.agreed_rows, t.given_rows),
            "by_role": {
                role: {"rows": n, "agreed_rows": a} for role, (n, a) in sorted(t.by_role.items())
            },
        },
        "accuracy": {
            "labeled_rows": t.labeled,
            "correct": t.correct,
            "accuracy": _rate(t.correct, t.labeled),
            "given_labeled_rows": t.given_labeled,
            "given_correct": t.given_correct,
            "given_accuracy": _rate(t.given_correct, t.given_labeled),
        },
        "divergence": {
            "against": names.REAL,
            "records": t.real_records,
            "rows": t.real_rows,
            "disagreements": t.real_disagreements,
            "disagreement_rate": _rate(t.real_disagreements, t.real_rows),
            "js_mean": t.js_sum / t.real_records if t.real_records else None,
            "js_max": t.js_max if t.real_records else None,
            "histogram": {"edges": HISTOGRAM_EDGES, "counts": t.js_counts},
        },
        "latency": {
            "batches": t.batches,
            "batch_ms_mean": t.model_ms_sum / t.batches if t.batches else None,
            "batch_ms_max": t.model_ms_max if t.batches else None,
            "row_us_mean": 1000 * t.model_ms_sum / t.rows if t.rows else None,
        },
    }


def new_report(
    replay_id: str,
    deployment: str,
    model: str,
    version: int,
    request: dict[str, Any],
    positions: Positions | None,
    batch_rows: int,
    now_ms: float,
) -> dict[str, Any]:
    """A report before its first batch (``positions`` None: resolved by the runner)."""
    report = {
        "id": replay_id,
        "deployment": deployment,
        "model": {"name": model, "version": version},
        "state": RUNNING,
        "phase": "resolving" if positions is None else "scoring",
        "request": request,
        "positions": None if positions is None else positions_json(positions),
        "batch_rows": batch_rows,
        "progress": {"done": 0, "total": None},
        "timing": {"created_ms": now_ms, "updated_ms": now_ms, "finished_ms": None, "runs": 0},
    }
    return report_view(report, Tally())


def count_request(
    t: Tally,
    rid: str,
    labels: np.ndarray,
    proba: np.ndarray,
    given: Given | None,
    truth: tuple[int, ...] | None,
) -> None:
    """Add one request: our answer (``labels``, ``proba``), what it got then (``given``) and
    the true class of each of its rows (``truth``; figures in rows)."""
    ours = [int(v) for v in labels]
    t.records += 1
    t.rows += len(ours)
    for v in ours:
        t.predicted[str(v)] = t.predicted.get(str(v), 0) + 1
    h = hashlib.sha256(t.digest.encode())
    h.update(rid.encode())
    h.update(labels.astype("<i8").tobytes())
    h.update(proba.astype("<f4").tobytes())
    t.digest = h.hexdigest()
    if truth is not None and len(truth) != len(ours):
        t.skipped["label_rows"] = t.skipped.get("label_rows", 0) + 1
        truth = None
    if truth is not None:
        t.labeled += len(ours)
        t.correct += sum(a == b for a, b in zip(ours, truth, strict=True))
    if given is None:
        return
    t.matched += 1
    if given.role is None:
        t.no_answer += 1
    elif given.labels is not None and len(given.labels) == len(ours):
        agreed = sum(a == b for a, b in zip(given.labels, ours, strict=True))
        t.given_rows += len(ours)
        t.agreed_rows += agreed
        role = t.by_role.setdefault(given.role, [0, 0])
        role[0] += len(ours)
        role[1] += agreed
        if truth is not None:
            t.given_labeled += len(ours)
            t.given_correct += sum(a == b for a, b in zip(given.labels, truth, strict=True))
    if given.real_labels is not None and given.real_proba is not None:
        try:
            d = divergence(given.real_labels, np.asarray(given.real_proba), ours, proba)
        except ValueError:
            t.skipped["divergence"] = t.skipped.get("divergence", 0) + 1
            return
        t.real_records += 1
        t.real_rows += d.rows
        t.real_disagreements += d.disagreements
        t.js_sum += d.js_mean
        t.js_max = max(t.js_max, d.js_mean)  # per request, as the mean and the histogram
        t.js_counts[min(int(d.js_mean * 10), 9)] += 1
