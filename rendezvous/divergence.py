"""How far two models' answers to the same rows lie apart. Pure numpy, no I/O.

Three measures per row: label disagreement, absolute difference of the positive-class
probability (binary models), and the Jensen-Shannon distance of the probability vectors
(base 2, so it lies in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_EPS = 1e-12


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon distance (square root of the divergence, log base 2)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / np.clip(p.sum(axis=-1, keepdims=True), _EPS, None)
    q = q / np.clip(q.sum(axis=-1, keepdims=True), _EPS, None)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ratio = np.where(a > 0, a / np.clip(b, _EPS, None), 1.0)
        return np.sum(np.where(a > 0, a * np.log2(ratio), 0.0), axis=-1)

    js = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return np.sqrt(np.clip(js, 0.0, 1.0))


@dataclass(frozen=True, slots=True)
class Divergence:
    """Per-request summary over its rows (one row for a feature-object request)."""

    rows: int
    disagreements: int
    abs_diff_mean: float | None
    abs_diff_max: float | None
    js_mean: float
    js_max: float

    @property
    def disagreement_rate(self) -> float:
        return self.disagreements / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "disagreements": self.disagreements,
            "disagreement_rate": self.disagreement_rate,
            "abs_diff_mean": self.abs_diff_mean,
            "abs_diff_max": self.abs_diff_max,
            "js_mean": self.js_mean,
            "js_max": self.js_max,
        }


def divergence(
    labels_a: list[int],
    proba_a: np.ndarray,
    labels_b: list[int],
    proba_b: np.ndarray,
) -> Divergence:
    """Compare two models' outputs for the same rows (same class order in both)."""
    pa = np.asarray(proba_a, dtype=np.float64)
    pb = np.asarray(proba_b, dtype=np.float64)
    if pa.shape != pb.shape or len(labels_a) != len(labels_b) or len(labels_a) != pa.shape[0]:
        raise ValueError(f"outputs do not line up: {pa.shape} vs {pb.shape}")
    rows = pa.shape[0]
    disagreements = int(sum(a != b for a, b in zip(labels_a, labels_b, strict=True)))
    js = js_distance(pa, pb)
    abs_mean = abs_max = None
    if pa.shape[1] == 2:
        diff = np.abs(pa[:, 1] - pb[:, 1])
        abs_mean, abs_max = float(diff.mean()), float(diff.max())
    return Divergence(
        rows=rows,
        disagreements=disagreements,
        abs_diff_mean=abs_mean,
        abs_diff_max=abs_max,
        js_mean=float(js.mean()),
        js_max=float(js.max()),
    )
