"""What training says about each feature and how live values differ from it: the
``FeatureProfile`` (the feature spec's training statistics as the arrays the detectors compare
rows with), where the latest values started to differ (``change_point``) and how, in words and
figures (``describe``). Apart from the detectors (``rendezvous.drift_detect``,
``rendezvous.drift_prior``): an alert's explanation reads the profile and the values only, not
the test that raised it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rendezvous.spec import FeatureSpec


@dataclass(frozen=True, eq=False)
class FeatureProfile:
    """The training statistics of the features that have them, as arrays."""

    names: tuple[str, ...]
    columns: np.ndarray
    """Indices of these features in the spec's rows."""
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    median: np.ndarray
    spread: np.ndarray
    """Training 90th minus 10th percentile (or 4 std)."""
    cuts: np.ndarray
    """(features, levels) training quantiles, non-decreasing."""
    levels: np.ndarray
    cdf_lo: np.ndarray
    cdf_hi: np.ndarray
    """Bounds on the training share of values below each cut (equal unless cuts tie)."""
    most_mass: np.ndarray
    """The most of the rows any one value may hold (``FeatureStats.most_mass``; 1 where the
    statistics predate it: the deciles' bound alone)."""

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> FeatureProfile | None:
        """None when no feature carries statistics with quantiles on one set of levels."""
        levels: list[float] | None = None
        rows: list[tuple[int, str, Any, list[float]]] = []
        for i, name in enumerate(spec.names):
            stats = spec.stats.get(name)
            if stats is None or not stats.quantiles:
                continue
            keys = sorted(stats.quantiles, key=float)
            these = [float(k) for k in keys]
            if levels is None:
                levels = these
            elif these != levels:
                continue
            rows.append((i, name, stats, [stats.quantiles[k] for k in keys]))
        if not rows or levels is None:
            return None
        lv = np.asarray(levels, dtype=np.float64)
        cuts = np.maximum.accumulate(np.asarray([r[3] for r in rows], dtype=np.float64), axis=1)
        lo = np.asarray([r[2].min for r in rows], dtype=np.float64)
        hi = np.asarray([r[2].max for r in rows], dtype=np.float64)
        cuts = np.clip(cuts, lo[:, None], hi[:, None])
        cdf_lo = np.tile(lv, (len(rows), 1))
        cdf_hi = cdf_lo.copy()
        for f in range(len(rows)):
            for j in range(len(lv)):
                same = np.flatnonzero(cuts[f] == cuts[f, j])
                below = np.flatnonzero(cuts[f] < cuts[f, j])
                if len(same) > 1:
                    # Training values tied at a cut: the share strictly below it lies between
                    # the level of the cut before the tie and the tie's first level.
                    cdf_hi[f, j] = lv[same[0]]
                    cdf_lo[f, j] = lv[below[-1]] if len(below) else 0.0
                if cuts[f, j] <= lo[f]:  # nothing lies below the minimum
                    cdf_lo[f, j] = cdf_hi[f, j] = 0.0
        q = {float(k): v for k, v in zip(lv, cuts.T, strict=True)}
        median = q.get(0.5, np.asarray([r[2].mean for r in rows], dtype=np.float64))
        std = np.asarray([max(r[2].std, 0.0) for r in rows], dtype=np.float64)
        spread = q[0.9] - q[0.1] if 0.1 in q and 0.9 in q else 4.0 * std
        return cls(
            names=tuple(r[1] for r in rows),
            columns=np.asarray([r[0] for r in rows], dtype=np.intp),
            lo=lo,
            hi=hi,
            mean=np.asarray([r[2].mean for r in rows], dtype=np.float64),
            std=std,
            median=np.asarray(median, dtype=np.float64),
            spread=np.asarray(spread, dtype=np.float64),
            cuts=cuts,
            levels=lv,
            cdf_lo=cdf_lo,
            cdf_hi=cdf_hi,
            most_mass=np.asarray(
                [1.0 if r[2].most_mass is None else r[2].most_mass for r in rows], dtype=np.float64
            ),
        )

    @property
    def width(self) -> int:
        return len(self.names)

    def mass_bound(self, f: int, value: float) -> float:
        """Most training mass the statistics allow on exactly ``value`` of feature ``f``: the
        deciles' (the levels about it), and at most what any one value may hold."""
        if value < self.lo[f] or value > self.hi[f]:
            return 0.0
        c, lv = self.cuts[f], self.levels
        under = np.flatnonzero(c < value)
        over = np.flatnonzero(c > value)
        low = float(lv[under[-1]]) if len(under) else 0.0
        high = float(lv[over[0]]) if len(over) else 1.0
        return min(high - low, float(self.most_mass[f]))

    def row_evidence(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: which features lie outside the training range (rows x features booleans),
        how many, and the distance to the training centre as the root mean square of the
        z-scores (a diagonal Mahalanobis distance over the features' count: about 1 for a
        typical training row)."""
        x = np.asarray(matrix, dtype=np.float64)[:, self.columns]
        out = (x < self.lo) | (x > self.hi)
        z = (x - self.mean) / np.where(self.std > 0, self.std, 1.0)
        return out, out.sum(axis=1), np.sqrt(np.mean(z * z, axis=1))


def change_point(values: np.ndarray, min_rows: int = 8) -> int:
    """Where the latest values most likely started to differ from the earlier ones: the split
    that maximises the standardised difference of mean ranks (a rank CUSUM, robust to heavy
    tails); 0 when no later part of at least ``min_rows`` values stands out."""
    n = len(values)
    if n < 2 * min_rows:
        return 0
    _, where, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[where]  # ties share their mean rank
    c = np.cumsum(ranks - ranks.mean())[:-1]
    k = np.arange(1, n, dtype=np.float64)
    stat = np.abs(c) / np.sqrt(k * (n - k))
    stat[n - min_rows :] = 0.0
    split = int(np.argmax(stat)) + 1
    # standardised by the ranks' spread, about N(0, 1) at each split when nothing changed; no
    # clear change (the whole span moved, or nothing did): keep every value
    return split if stat[split - 1] * math.sqrt(12.0 / n) > 3.5 else 0


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _about(x: float) -> str:
    """Two significant digits, plainly: 10, 2.5, 1,200."""
    rounded = float(f"{x:.2g}")
    return f"{rounded:,.0f}" if rounded >= 10 else f"{rounded:g}"


def describe(profile: FeatureProfile, f: int, values: np.ndarray) -> dict[str, Any]:
    """How the live values of feature ``f`` differ from training, in words and figures."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"detail": "no recent values"}
    med = float(np.median(v))
    q10, q90 = (float(x) for x in np.quantile(v, [0.1, 0.9]))
    tmed, tspread = float(profile.median[f]), float(profile.spread[f])
    above = float(np.mean(v > profile.hi[f]))
    below = float(np.mean(v < profile.lo[f]))
    uniq, counts = np.unique(v, return_counts=True)
    top = int(np.argmax(counts))
    modal_share = float(counts[top]) / len(v)
    doc: dict[str, Any] = {
        "median": round(med, 6),
        "training_median": round(tmed, 6),
        "above_max": round(above, 4),
        "below_min": round(below, 4),
    }
    parts = []
    if modal_share >= 0.5 and len(v) >= 5:
        parts.append(f"stuck at {_fmt(float(uniq[top]))} in {modal_share:.0%} of rows")
    # ratios and signs say something only of values clearly on one side of zero in training
    # (a feature centred on -0.06 was said to have turned "of the opposite sign")
    elif abs(tmed) <= tspread / 2:
        pass
    elif tmed != 0 and med != 0 and np.sign(tmed) == np.sign(med):
        ratio = med / tmed
        if ratio >= 1.8:
            parts.append(f"values about {_about(ratio)} times larger than in training")
        elif ratio <= 1 / 1.8:
            parts.append(f"values about {_about(1 / ratio)} times smaller than in training")
    elif tmed != 0 and med != 0:
        parts.append("values of the opposite sign to training's")
    if above >= 0.01:
        parts.append(f"{above:.0%} above the training max {_fmt(float(profile.hi[f]))}")
    if below >= 0.01:
        parts.append(f"{below:.0%} below the training min {_fmt(float(profile.lo[f]))}")
    std = float(profile.std[f])
    shift = f" ({(med - tmed) / std:+.2g} training std)" if std > 0 else ""
    parts.append(f"median {_fmt(med)} against {_fmt(tmed)} in training{shift}")
    if tspread > 0 and modal_share < 0.5 and "times" not in "".join(parts):
        ratio = (q90 - q10) / tspread
        if ratio >= 1.15 or ratio <= 0.87:
            parts.append(f"spread (10th to 90th percentile) x{ratio:.2g} training's")
    doc["detail"] = "; ".join(parts)
    return doc
