"""Drift alerts: the thresholds, the report of one merged window and the alerts it raises
or clears. Pure: the monitor (``gateway.observability.drift_monitor``) reads the window and
stores the
outcome."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from rendezvous.drift import (
    DISTANCE_EDGES,
    DIVERGENCE_EDGES,
    SCORE_EDGES,
    Sketch,
    fractions,
    histogram_quantile,
    js_distance_counts,
    psi,
)
from rendezvous.drift_reference import FeatureReference
from rendezvous.drift_settings import KINDS as ONLINE_KINDS

ALERT_KINDS: tuple[str, ...] = (
    "divergence_mean",
    "disagreement_rate",
    "score_psi",
    "score_js",
    "feature_psi",
    "class_psi",
    "class_js",
)
"""The kinds the drift monitor judges on merged windows of sketches."""
ALL_ALERT_KINDS: tuple[str, ...] = (*ALERT_KINDS, *ONLINE_KINDS)
"""With the kinds of the online detectors (``rendezvous.drift_settings``)."""


NEWER_KINDS: tuple[str, ...] = ("class_psi", "class_js")
"""Thresholds a version before this one does not know: it reads a stored set holding one as
invalid as a whole ("unknown threshold") and judges every kind on its defaults, so a set is
stored with them only once they differ from the defaults (``drift_view.set_thresholds``)."""

AT_MOST_ONE = frozenset({"divergence_mean", "disagreement_rate", "score_js", "class_js"})
"""Thresholds of figures in [0, 1]: 1 or more would switch the alert off without a word."""


def _finite(value: float) -> bool:
    """``math.isfinite``, False for an integer too large for a float (it raised: a 500)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds; a figure strictly above its threshold raises the alert.

    Tuned on the demo models (tests/test_drift.py): 1000 windows of 200 (the smallest
    evaluated) and of 600 single-row requests drawn from the 143-row held-out split, as
    drawn ("calm") or with the image scale up 30 % (lengths x1.3, areas x1.69, "shifted").
    Worst calm window at 200 / 600 requests, then the shifted median at 200:
    divergence_mean 0.113 / 0.094, 0.130; disagreement_rate 0.090 / 0.072, 0.130 (the demo
    models differ on ~4 % of rows by nature, so 0.05 false-alarmed); score_psi 0.289 / 0.191,
    0.557 (shifted min 0.299 / 0.342); score_js 0.207 / 0.173, 0.305 (min 0.227 / 0.244);
    feature_psi 0.924 / 0.447, 2.35 (min 1.61 / 1.77, every shifted feature above 1.18).
    feature_psi is the largest of 30 PSIs over a few hundred rows, hence 1.0 and not the
    textbook 0.25 meant for one feature and many rows. At 100 requests calm windows reach
    score_psi 0.42 and feature_psi 1.0: too few to judge, hence min_requests 200.

    class_psi and class_js judge a multiclass model's predicted-class mix (a few bins, so far
    less sampling noise than ten score bins): drawn from its reference mix, 200 requests of a
    3-class model reach at most 0.10 / 0.13 (5,000 draws; 10 classes: 0.37 / 0.18 with one
    class of half the rows, 0.16 / 0.17 balanced), while a third of each class becoming
    60/20/20 reads 0.29 / 0.23 (tests/test_class_drift.py). Many classes of a few rows each
    are noisier (20 classes, one of 90 %: PSI up to 0.33 at 200 requests): raise these for
    such a model.
    """

    divergence_mean: float = 0.12
    disagreement_rate: float = 0.1
    score_psi: float = 0.3
    score_js: float = 0.22
    feature_psi: float = 1.0
    class_psi: float = 0.2
    class_js: float = 0.2
    min_requests: int = 200

    def to_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Thresholds:
        return cls().merged(doc)

    def merged(self, changes: Mapping[str, Any]) -> Thresholds:
        """A copy with ``changes`` applied; ValueError naming the offending key."""
        known = {f.name for f in fields(self)}
        current = self.to_dict()
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown threshold {key!r}; known: {sorted(known)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"threshold {key!r} must be a number, got {value!r}")
            if not _finite(value) or value < 0:
                raise ValueError(f"threshold {key!r} must be finite and >= 0, got {value!r}")
            if key in AT_MOST_ONE and value >= 1:  # the figure never passes it: an alert off
                raise ValueError(f"threshold {key!r} must be below 1 (a share or a distance "
                                 f"in [0, 1], never above it), got {value!r}")  # fmt: skip
            if key == "min_requests":
                if value != int(value):
                    raise ValueError(f"threshold 'min_requests' must be an integer, got {value!r}")
                current[key] = int(value)
            else:
                current[key] = float(value)
        return Thresholds(**current)  # type: ignore[arg-type]


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def _fractions_or_none(counts: np.ndarray | None) -> list[float] | None:
    if counts is None or np.asarray(counts).sum() <= 0:
        return None
    return [round(float(v), 6) for v in fractions(counts, "histogram")]


def _feature_psi(w: Sketch, ref: FeatureReference | None) -> dict[str, float]:
    """PSI per feature; empty unless the window's counts were built against ``ref``."""
    c = w.features
    if ref is None or c is None or w.feature_version != ref.version:
        return {}
    if c.shape != ref.expected.shape or c.sum() == 0:
        return {}
    return {n: round(psi(ref.expected[i], c[i]), 6) for i, n in enumerate(ref.names)}


def _ood_report(w: Sketch, ref: FeatureReference | None, top_k: int) -> dict[str, Any] | None:
    """Out-of-distribution evidence of the window's rows (None without any)."""
    if not w.feature_rows or w.distance.sum() == 0:
        return None
    rates: dict[str, float] = {}
    if ref is not None and w.out_of_range is not None and len(ref.names) == len(w.out_of_range):
        for name, n in zip(ref.names, w.out_of_range.tolist(), strict=True):
            if n:
                rates[name] = round(n / w.feature_rows, 6)
    top = sorted(rates.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
    return {
        "rows": w.feature_rows,
        "out_of_range_rows": w.ood_rows,
        "rate": _r(w.ood_rows / w.feature_rows),
        "features": [{"feature": n, "rate": v} for n, v in top],
        "distance": {
            f"p{round(q * 100)}": _r(
                histogram_quantile(DISTANCE_EDGES, w.distance, q, open_last=True)
            )
            for q in (0.5, 0.9, 0.99)
        },
        "distance_edges": list(DISTANCE_EDGES),
        "distance_counts": w.distance.tolist(),
        # the same figures every decision record carries (``ood``), and the training rows'
        # own distances to read them against
        "distance_method": ref.ood.method if ref is not None and ref.ood is not None else None,
        "training_distance": {
            f"p{round(float(q) * 100)}": v for q, v in ref.ood.training_distance.items()
        }
        if ref is not None and ref.ood is not None
        else {},
    }


def _class_report(
    w: Sketch, reference: np.ndarray | None, labels: list[str] | None
) -> dict[str, Any] | None:
    """A multiclass model's predicted-class mix against its reference (None for a binary
    model's window, which counts none): PSI and JS distance as for the scores."""
    if w.predicted is None or w.predicted.sum() == 0:
        return None
    ref = _fractions_or_none(reference)
    if ref is not None and len(ref) != len(w.predicted):
        ref = None  # not this model's classes
    psi_value = js = None
    if ref is not None:
        psi_value = psi(np.asarray(ref), w.predicted)
        js = js_distance_counts(np.asarray(ref), w.predicted)
    if labels is None or len(labels) != len(w.predicted):
        labels = [str(i) for i in range(len(w.predicted))]
    return {
        "psi": _r(psi_value),
        "js_distance": _r(js),
        "labels": labels,
        "real": _fractions_or_none(w.predicted),
        "reference": ref,
    }


def window_report(
    window: Sketch,
    *,
    score_reference: np.ndarray | None,
    reference_source: str | None,
    features: FeatureReference | None,
    thresholds: Thresholds,
    top_k: int = 5,
    class_reference: np.ndarray | None = None,
    class_labels: list[str] | None = None,
) -> dict[str, Any]:
    """JSON-ready statistics of one merged window; ``values`` holds the figure each threshold
    is compared with (None when the window cannot say). ``classes`` is a multiclass model's
    predicted-class mix against ``class_reference`` (None for a binary model)."""
    w = window
    div: dict[str, Any] = {"mean": _r(w.divergence_sum / w.compared) if w.compared else None}
    for q in (0.5, 0.9, 0.99):
        div[f"p{round(q * 100)}"] = _r(histogram_quantile(DIVERGENCE_EDGES, w.divergence, q))
    rate = w.disagreements / w.compared_rows if w.compared_rows else None
    div.update(disagreement_rate=_r(rate), compared_rows=w.compared_rows)
    reference = _fractions_or_none(score_reference)
    score_psi = score_js = None
    if reference is not None and window.score_real.sum() > 0:
        score_psi = psi(np.asarray(reference), window.score_real)
        score_js = js_distance_counts(np.asarray(reference), window.score_real)
    feature_psi = _feature_psi(w, features)
    top = sorted(feature_psi.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
    max_psi = top[0][1] if top else None
    classes = _class_report(w, class_reference, class_labels)
    if classes is not None:
        classes["reference_source"] = reference_source if classes["reference"] else None
    return {
        "status": "ok" if window.requests >= thresholds.min_requests else "insufficient_data",
        "requests": window.requests,
        "rows": window.rows,
        "from_ms": window.start_ms,
        "to_ms": window.end_ms,
        "real_model": window.real_model,
        "canary_model": window.canary_model,
        "divergence": div,
        "score": {
            "psi": _r(score_psi),
            "js_distance": _r(score_js),
            "reference_source": reference_source if reference is not None else None,
            "edges": [round(float(e), 6) for e in SCORE_EDGES],
            "real": _fractions_or_none(window.score_real),
            "canary": _fractions_or_none(window.score_canary),
            "reference": reference,
        },
        "features": {
            "psi": feature_psi,
            "top": [{"feature": n, "psi": v} for n, v in top],
            "max_psi": max_psi,
        },
        "classes": classes,
        "ood": _ood_report(w, features, top_k),
        "values": {
            "divergence_mean": div["mean"],
            "disagreement_rate": div["disagreement_rate"],
            "score_psi": _r(score_psi),
            "score_js": _r(score_js),
            "feature_psi": max_psi,
            "class_psi": classes["psi"] if classes else None,
            "class_js": classes["js_distance"] if classes else None,
        },
    }


def evaluate_alerts(
    report: Mapping[str, Any],
    thresholds: Thresholds,
    active: Mapping[str, Mapping[str, Any]],
    now_ms: float,
    recent: Mapping[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Next alert state and the raise/clear events that lead to it. Without enough data, or
    without a figure for a kind, that kind keeps its state: silence is not recovery.

    ``recent``: the report of the latest part of the window, when it is judged. A kind is then
    raised only when both the window and its latest part are over the threshold, and cleared
    as soon as the latest part is back under it: the window's older requests, from before the
    cause went away, no longer hold the alert up."""
    state = {kind: dict(alert) for kind, alert in active.items()}
    events: list[dict[str, Any]] = []
    if report.get("status") != "ok":
        return state, events
    values = report.get("values") or {}
    latest = (recent.get("values") or {}) if recent and recent.get("status") == "ok" else None
    for kind in ALERT_KINDS:
        value = values.get(kind)
        if value is None:
            continue
        limit = float(getattr(thresholds, kind))
        now = latest.get(kind) if latest is not None else None
        over = value > limit and (now is None or now > limit)
        under = (now if now is not None else value) <= limit
        shown = value if now is None or kind not in state else now
        event = {"kind": kind, "value": shown, "threshold": limit, "ts_ms": now_ms}
        if over:
            detail = describe_alert(kind, value, limit, report)
            statistic = f"{_SAID.get(kind, kind)} over the last {report.get('requests')} requests"
            if kind in state:
                state[kind].update(value=value, threshold=limit, detail=detail)
            else:
                state[kind] = {
                    "kind": kind,
                    "value": value,
                    "threshold": limit,
                    "since_ms": now_ms,
                    "statistic": statistic,
                    "detail": detail,
                }
                events.append({"type": "raised", **event, "detail": detail})
        elif kind in state and under:
            del state[kind]
            events.append({"type": "cleared", **event})
    return state, events


_SAID = {
    "divergence_mean": "mean divergence between real and canary",
    "disagreement_rate": "share of rows where real and canary disagree",
    "score_psi": "PSI of real's scores from the reference",
    "score_js": "JS distance of real's scores from the reference",
    "feature_psi": "largest feature PSI from training",
    "class_psi": "PSI of real's predicted-class mix from the reference",
    "class_js": "JS distance of real's predicted-class mix from the reference",
}


def describe_alert(kind: str, value: float, limit: float, report: Mapping[str, Any]) -> str:
    """The alert in words, as the online detectors' alerts carry one (what webhooks and the
    dashboard show): the figure, its threshold, the window and, for features, which."""
    window = report.get("requests")
    said = f"{_SAID.get(kind, kind)} {value:.3g} > {limit:.3g} over {window} requests"
    top = (report.get("features") or {}).get("top") or []
    if kind == "feature_psi" and top:
        said += " (" + ", ".join(f"{t['feature']} {t['psi']:.3g}" for t in top[:3]) + ")"
    classes = report.get("classes") or {}
    if kind in ("class_psi", "class_js") and classes.get("reference") and classes.get("real"):
        moves = zip(classes["labels"], classes["real"], classes["reference"], strict=True)
        label, live, ref = max(moves, key=lambda m: abs(m[1] - m[2]))
        said += f" (most moved: {label} {live:.0%} of predictions, {ref:.0%} in the reference)"
    return said
