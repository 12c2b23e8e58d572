"""Live accuracy from labelled requests: which model is right, on the same requests.

Pure functions over ``Labelled`` entries (``rendezvous.outcomes``): the latest window of
labelled requests (a relabel replaces the earlier label), figures per role and model version
(accuracy, per-class precision and recall, log loss, Brier score, reliability bins and expected
calibration error), and the paired comparison of two versions on the requests both scored,
with the exact McNemar test. Written with numpy rather than ``sklearn.metrics``: a gateway
process never loads scikit-learn (tens of MB each, ``tests/test_layers.py``); the tests check
every figure against ``sklearn.metrics`` and ``scipy.stats.binomtest``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rendezvous.outcomes import Labelled

CALIBRATION_BINS = 10
LOG_EPS = float(np.finfo(np.float32).eps)
"""Probabilities are clipped to [eps, 1 - eps] for the log loss, as scikit-learn does for
float32 probabilities, which the models answer and the outcomes keep (to the decision
record's six decimals: a probability under 5e-7 reads as 0). float64's eps counted such a
row as a loss of 36 where scikit-learn on the model's own outputs counts 15.9."""


def latest(entries: Iterable[Labelled], window: int) -> list[Labelled]:
    """The latest label of each request, for the ``window`` requests labelled last, oldest
    first. ``entries`` in stream order (oldest first)."""
    last: dict[str, Labelled] = {}
    for entry in entries:
        last.pop(entry.request_id, None)  # re-inserted: the order is the latest label's
        last[entry.request_id] = entry
    kept = list(last.values())
    return kept[-window:] if window > 0 else []


@dataclass
class _Samples:
    """The rows a model version was judged on: labelled rows, and the judged (``correct``)
    rows of the answers it gave; ``roles``: the roles it scored them in (latest last)."""

    roles: dict[str, None] = field(default_factory=dict)
    requests: int = 0
    judged: int = 0
    y_true: list[int] = field(default_factory=list)
    y_pred: list[int] = field(default_factory=list)
    proba: list[Sequence[float]] = field(default_factory=list)
    weight: list[float] = field(default_factory=list)
    judged_ok: list[bool] = field(default_factory=list)
    judged_weight: list[float] = field(default_factory=list)


def _collect(rows: Sequence[Labelled]) -> dict[str, _Samples]:
    """Samples by model version: a version's figures follow it from one role to the next (a
    challenger promoted to real keeps the evidence it gathered as a challenger). A request
    counts once for a version that scored it in two roles (real and the new canary, across a
    promotion): it was counted twice, and moved that version's figures."""
    groups: dict[str, _Samples] = {}
    for entry in rows:
        label, outcome = entry.label, entry.outcome
        counted: set[str] = set()
        for role, answer in outcome.answers.items():
            if label.labels is None and not (
                label.correct is not None and role == outcome.chosen_role
            ):
                continue
            s = groups.setdefault(answer.model_key, _Samples())
            s.roles.pop(role, None)
            s.roles[role] = None
            if answer.model_key in counted:
                continue
            counted.add(answer.model_key)
            if label.labels is not None:
                s.requests += 1
                s.y_true += label.labels
                s.y_pred += answer.labels
                s.proba += answer.probabilities
                s.weight += [label.weight] * len(answer.labels)
            else:
                s.judged += 1
                s.judged_ok += [bool(label.correct)] * len(answer.labels)
                s.judged_weight += [label.weight] * len(answer.labels)
    return groups


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def classification_figures(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    proba: Sequence[Sequence[float]],
    weight: Sequence[float],
    classes: Sequence[int],
) -> dict[str, Any]:
    """Accuracy, precision and recall per class, log loss, Brier score and calibration of
    labelled rows (``proba``'s columns are ``classes`` in order; sample weights)."""
    if not y_true:
        return {"accuracy": None, "log_loss": None, "brier": None, "ece": None,
                "precision": {}, "recall": {}, "calibration": []}  # fmt: skip
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    w = np.asarray(weight, dtype=np.float64)
    p = np.asarray(proba, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    index = {c: k for k, c in enumerate(classes)}
    true_col = np.array([index[y] for y in y_true])
    onehot = np.zeros_like(p)
    onehot[np.arange(len(yt)), true_col] = 1.0
    total = w.sum()
    right = (yt == yp).astype(np.float64)
    precision, recall = {}, {}
    for c in classes:
        hit = float(np.sum(w * ((yp == c) & (yt == c))))
        precision[str(c)] = _ratio(hit, float(np.sum(w * (yp == c))))
        recall[str(c)] = _ratio(hit, float(np.sum(w * (yt == c))))
    picked = np.clip(p[np.arange(len(yt)), true_col], LOG_EPS, 1 - LOG_EPS)
    log_loss = float(np.sum(w * -np.log(picked)) / total)
    if p.shape[1] == 2:  # scikit-learn's binary Brier: the positive (greater) class alone
        brier = float(np.sum(w * (p[:, 1] - onehot[:, 1]) ** 2) / total)
    else:
        brier = float(np.sum(w * np.sum((p - onehot) ** 2, axis=1)) / total)
    confidence = p.max(axis=1)
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, CALIBRATION_BINS - 1)
    bins, ece = [], 0.0
    for b in range(CALIBRATION_BINS):
        mask = which == b
        wb = float(w[mask].sum())
        if wb <= 0:
            continue
        conf = float(np.sum(w[mask] * confidence[mask]) / wb)
        acc = float(np.sum(w[mask] * right[mask]) / wb)
        ece += wb / total * abs(acc - conf)
        bins.append({"from": float(edges[b]), "to": float(edges[b + 1]), "rows": int(mask.sum()),
                     "confidence": conf, "accuracy": acc})  # fmt: skip
    return {
        "accuracy": float(np.sum(w * right) / total),
        "log_loss": log_loss,
        "brier": brier,
        "ece": ece,
        "precision": precision,
        "recall": recall,
        "calibration": bins,
    }


def _figures(s: _Samples, classes: Sequence[int]) -> dict[str, Any]:
    out = classification_figures(s.y_true, s.y_pred, s.proba, s.weight, classes)
    ok = np.asarray(s.judged_ok, dtype=np.float64)
    jw = np.asarray(s.judged_weight, dtype=np.float64)
    if len(ok):  # judgements count for accuracy only (they name no class)
        lw = np.asarray(s.weight, dtype=np.float64)
        labelled_right = (np.asarray(s.y_true) == np.asarray(s.y_pred)) if s.y_true else []
        num = float(np.sum(lw * labelled_right)) + float(np.sum(jw * ok))
        out["accuracy"] = _ratio(num, float(lw.sum() + jw.sum()))
    return {"labelled": s.requests, "rows": len(s.y_true), "judged": s.judged, **out}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: the binomial test of ``only_a`` successes in
    ``only_a + only_b`` discordant pairs at one half (``scipy.stats.binomtest``'s p-value)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    if 2 * k == n:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def paired(rows: Sequence[Labelled], candidate: str, baseline: str) -> dict[str, Any]:
    """``candidate`` against ``baseline`` (``model:version`` each) on the labelled rows both
    scored: counts, accuracies, the discordant pairs and McNemar's p-value (unweighted: the
    test counts rows)."""
    a_right: list[bool] = []
    b_right: list[bool] = []
    requests = 0
    for entry in rows:
        labels = entry.label.labels
        if labels is None:
            continue
        by_key = {answer.model_key: answer for answer in entry.outcome.answers.values()}
        a, b = by_key.get(candidate), by_key.get(baseline)
        if a is None or b is None:
            continue
        requests += 1
        a_right += [y == p for y, p in zip(labels, a.labels, strict=True)]
        b_right += [y == p for y, p in zip(labels, b.labels, strict=True)]
    n = len(a_right)
    only_a = sum(1 for x, y in zip(a_right, b_right, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a_right, b_right, strict=True) if y and not x)
    acc_a = _ratio(sum(a_right), n)
    acc_b = _ratio(sum(b_right), n)
    return {
        "candidate": candidate,
        "baseline": baseline,
        "requests": requests,
        "rows": n,
        "candidate_accuracy": acc_a,
        "baseline_accuracy": acc_b,
        "gain": None if acc_a is None or acc_b is None else acc_a - acc_b,
        "candidate_only_right": only_a,
        "baseline_only_right": only_b,
        "p_value": mcnemar_p(only_a, only_b),
    }


def accuracy_report(
    entries: Iterable[Labelled],
    window: int,
    classes: Sequence[int] | None,
    current: Mapping[str, str],
) -> dict[str, Any]:
    """The live-accuracy report of the latest ``window`` labelled requests: figures per model
    version (``role``: the role it holds now, else the last it scored in; ``roles``: those it
    scored these requests in), and every other current role paired with real's current
    version. ``current``: role -> ``model:version`` holding it now."""
    rows = latest(entries, window)
    groups = _collect(rows)
    if classes is None:
        width = max((len(p[0]) for s in groups.values() for p in [s.proba] if p), default=2)
        classes = list(range(width))
    holder = {key: role for role, key in current.items()}
    models = [
        {
            "role": holder.get(key, list(s.roles)[-1]),
            "model": key,
            "current": key in holder,
            "roles": list(s.roles),
            **_figures(s, classes),
        }
        for key, s in sorted(groups.items())
    ]
    real = current.get("real")
    pairs = [
        {"role": role, **paired(rows, key, real)}
        for role, key in sorted(current.items())
        if real is not None and role != "real"
    ]
    return {
        "window": window,
        "requests": len(rows),
        "labelled": sum(1 for e in rows if e.label.labels is not None),
        "judged": sum(1 for e in rows if e.label.labels is None),
        "classes": list(classes),
        "current": dict(current),
        "models": models,
        "paired": pairs,
    }


def gate_shortfalls(
    pair: Mapping[str, Any],
    min_labeled: int | None,
    min_accuracy_gain: float | None,
    significance: float | None,
) -> list[str]:
    """What a candidate's paired figures against real fall short of (empty: it passes). The
    gain must be at least ``min_accuracy_gain`` (default 0: not worse) and, when
    ``significance`` is set, better than real with McNemar's p-value under it."""
    out = []
    n = pair["rows"]
    if min_labeled and n < min_labeled:
        out.append(f"{n} labelled rows scored by both the candidate and real, fewer than "
                   f"min_labeled={min_labeled}")  # fmt: skip
    gain = pair["gain"]
    need = min_accuracy_gain if min_accuracy_gain is not None else 0.0
    figures = (
        f"accuracy {_pct(pair['candidate_accuracy'])} against real's "
        f"{_pct(pair['baseline_accuracy'])} on {n} rows; candidate alone right "
        f"{pair['candidate_only_right']}, real alone right {pair['baseline_only_right']}, "
        f"McNemar p={pair['p_value']:.4g}"
    )
    if gain is None:
        out.append("no labelled request scored by both the candidate and real")
        return out
    if gain < need:
        out.append(f"accuracy gain {gain:+.4f} below min_accuracy_gain={need} ({figures})")
    elif significance is not None and (
        pair["p_value"] >= significance
        or pair["candidate_only_right"] <= pair["baseline_only_right"]
    ):
        out.append(f"not significantly better than real at {significance} ({figures})")
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
