"""Online drift detectors: sequential tests on a stream of rows (the feature tests, run by the
log bin on every request it archives: ``models.feature_watch``) and of real's predicted labels
(the prior, run by each gateway process on its decisions), judged every few rows, so that a
broken feed is alerted within tens of rows instead of once a window of sketches has filled.
Numpy and the standard library only: scipy would do two of the sums below, but takes a second to
import, and the prior's first evaluation runs on a gateway's event loop (the tests check those
sums against scipy.stats).

What the traffic holds is tested against what the model was trained on (the feature spec's
``FeatureStats``: min, max, mean, std, deciles) and against the score distribution stored with
the real model:

``feature_range``
    Per feature, a Bernoulli CUSUM on "the value is outside the training range" (null rate at
    most ``range_null`` = 3 %, against 30 %) and one on "more than one training range beyond
    it" (0.2 % against 5 %): a unit change, a sign flip, a sentinel for missing values, values
    never seen in training.
``feature_stuck``
    Per feature, the same value in most of the latest ``stuck_rows`` rows, where training
    spreads its values (an exact binomial tail against the most mass the training deciles allow
    on that value): a feature stuck at a constant, or sent as 0 for "missing".
``feature_shift``
    Per feature, a Kolmogorov-Smirnov statistic at the training deciles over the latest 100
    and 400 rows: a moderate shift, two columns swapped, a class-prior shift that moves inputs.
``feature_drift``
    The same over the latest 1,600 rows, with a floor on the effect: a subtle shift.
``prediction_prior``
    Two one-sided Bernoulli CUSUMs on real's predicted class (score >= 0.5) against the share
    of positives its training scores had, with an indifference zone of +-``prior_tolerance``.

False alarms are budgeted per detector in alarms per 100,000 rows under the null (rows drawn
from the training distribution), and split over features and looks by Bonferroni: CUSUMs use
Wald's bound (an alarm within ``n`` rows has probability at most ``n * exp(-h)``), the window
tests the Kolmogorov-Smirnov tail at each look. Both are conservative; tests/test_drift_detect.py
measures the rates. Live traffic is never exactly the training distribution (a few hundred
held-out rows differ from training by a KS distance of up to ~0.09 per feature on the demo
data), so the window tests also need a minimum effect (``shift_floor``, ``drift_floor``):
statistically significant and big enough to matter.

Each raising test also clears by evidence, not by silence: a CUSUM alert clears when a reverse
CUSUM (the null against the alternative) crosses ``clear_h``; a window alert when its statistic
is back under ``clear_ratio`` of its threshold. When a gross alert (range, stuck) on a feature
clears, the slower windows of that feature start afresh: their content is the broken rows the
gross alert was about, and they would otherwise hold the feature in alert for thousands of rows
after the feed was fixed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rendezvous.quantile_bins import bin_index
from rendezvous.spec import FeatureSpec

KINDS: tuple[str, ...] = (
    "feature_range",
    "feature_stuck",
    "feature_shift",
    "feature_drift",
    "prediction_prior",
)
"""Alert kinds of the online detectors (one alert per kind and feature)."""

_MAX_CHUNK = 256
"""Rows handled in one step; a bigger batch is cut (the ring must hold a window and a step)."""


@dataclass(frozen=True)
class DetectorSettings:
    """Every constant of the online detectors; the defaults are what ``rdv serve`` runs."""

    check_rows: int = 16
    """The window tests are judged every this many rows at least (the CUSUMs at every row)."""
    range_alarms_per_100k: float = 0.02
    stuck_alarms_per_100k: float = 0.005
    shift_alarms_per_100k: float = 0.02
    drift_alarms_per_100k: float = 0.01
    prior_alarms_per_100k: float = 0.02
    range_null: float = 0.03
    """Highest share of rows outside the training range that is still normal (held-out rows
    fall outside it at a rate of about 2 / (training rows + 1) per feature)."""
    range_alt: float = 0.3
    far_null: float = 0.002
    """The same for values more than one training range beyond it."""
    far_alt: float = 0.05
    stuck_rows: int = 40
    stuck_min_share: float = 0.5
    shift_windows: tuple[int, ...] = (100, 400)
    shift_floors: tuple[float, ...] = (0.33, 0.2)
    drift_window: int = 1600
    drift_floor: float = 0.15
    min_fill: float = 0.25
    """A short window is judged once it holds this share of its rows; the long one only when
    full (partly filled, its floor would be too low for the few rows it holds)."""
    clear_ratio: float = 0.8
    gross_on: float = 0.4
    gross_off: float = 0.2
    """A feature's 100-row KS distance above ``gross_on`` starts a gross episode; back under
    ``gross_off``, the episode ends and the feature's slower windows start afresh."""
    prior_tolerance: float = 0.04
    """|predicted positive share - training's| up to this is normal..."""
    prior_shifts: tuple[float, ...] = (0.12, 0.25)
    """...and these are the shifts the prior CUSUMs are tuned to detect."""
    clear_h: float = math.log(20.0)
    """Reverse CUSUMs clear an alert once the evidence for the null is 20 to 1 (9 normal rows
    after a range alert: a process that gets a small share of the traffic clears soon)."""
    stuck_clear_rows: int = 12

    @property
    def windows(self) -> tuple[int, ...]:
        return (*self.shift_windows, self.drift_window)


def _cusum_h(alarms_per_100k: float, streams: int) -> float:
    """Threshold of ``streams`` CUSUMs sharing a budget of alarms per 100,000 rows (Wald)."""
    per_row = alarms_per_100k / 100_000 / max(streams, 1)
    return math.log(1.0 / per_row)


def ks_critical(n: int | np.ndarray, alpha: float) -> np.ndarray:
    """One-sample two-sided Kolmogorov-Smirnov critical value at level ``alpha`` for ``n``
    values (Stephens' approximation of the exact tail: within 0.3 % of ``scipy.stats.kstwo``
    from n = 100, and above it, so conservative, for fewer values)."""
    c = math.sqrt(-0.5 * math.log(alpha / 2.0))
    root = np.sqrt(np.maximum(np.asarray(n, dtype=np.float64), 1.0))
    return np.asarray(c / (root + 0.12 + 0.11 / root))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly (n is a few dozen here; scipy.stats
    would do the same but takes a second to import, on the gateway's event loop)."""
    return float(sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(max(k, 0), n + 1)))


@functools.lru_cache(maxsize=1024)
def _stuck_count(rows: int, mass: float, alpha: float) -> int:
    """Fewest rows of ``rows`` holding one value that a training mass of at most ``mass`` on
    that value gives with probability below ``alpha`` (exact binomial tail)."""
    if mass <= 0.0:
        return 2
    if mass >= 1.0:
        return rows + 1
    k = 2
    while k <= rows and binomial_tail(k, rows, mass) > alpha:
        k += 1
    return k


# -- what the training statistics say ---------------------------------------------------------


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
        )

    @property
    def width(self) -> int:
        return len(self.names)

    def mass_bound(self, f: int, value: float) -> float:
        """Most training mass the deciles allow on exactly ``value`` of feature ``f``."""
        if value < self.lo[f] or value > self.hi[f]:
            return 0.0
        c, lv = self.cuts[f], self.levels
        under = np.flatnonzero(c < value)
        over = np.flatnonzero(c > value)
        low = float(lv[under[-1]]) if len(under) else 0.0
        high = float(lv[over[0]]) if len(over) else 1.0
        return high - low

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


# -- the detectors ---------------------------------------------------------------------------


@dataclass
class _Cusum:
    """Many one-sided Bernoulli CUSUMs (one per column) of null ``p0`` against ``p1``, with a
    reverse CUSUM per column that clears an alarm once the evidence for ``p0`` is strong."""

    p0: np.ndarray
    p1: np.ndarray
    h: float
    clear_h: float
    s: np.ndarray = field(init=False)
    back: np.ndarray = field(init=False)
    alarm: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.up = np.log(self.p1 / self.p0)
        self.down = np.log((1 - self.p1) / (1 - self.p0))
        self.s = np.zeros(self.p0.shape)
        self.back = np.zeros(self.p0.shape)
        self.alarm = np.zeros(self.p0.shape, dtype=bool)

    @staticmethod
    def _run(start: np.ndarray, inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Page's recursion s = max(0, s + inc) over the rows of ``inc`` at once: the final
        value and the highest along the way."""
        c = np.cumsum(inc, axis=0)
        path = c - np.minimum(np.minimum.accumulate(c, axis=0), -start)
        return path[-1], path.max(axis=0)

    def update(self, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed (rows x columns) booleans; returns the columns raised and cleared."""
        inc = np.where(hits, self.up, self.down)
        self.s, peak = self._run(self.s, inc)
        self.s = np.minimum(self.s, 2 * self.h)
        raised = ~self.alarm & (peak > self.h)
        self.back[raised] = 0.0
        self.back, back_peak = self._run(self.back, -inc)
        cleared = self.alarm & (back_peak > self.clear_h)
        self.alarm = (self.alarm | raised) & ~cleared
        self.s[cleared] = 0.0
        self.back[~self.alarm] = 0.0
        return raised, cleared

    def reset(self, columns: np.ndarray) -> None:
        self.s[columns] = 0.0
        self.back[columns] = 0.0
        self.alarm[columns] = False


class FeatureDetectors:
    """The feature tests of one deployment in one process (range, stuck, shift, drift)."""

    def __init__(self, profile: FeatureProfile, settings: DetectorSettings | None = None):
        self.profile = p = profile
        self.settings = s = settings or DetectorSettings()
        n = p.width
        self.rows_seen = 0
        self._since_check = 0
        span = np.maximum(p.hi - p.lo, np.maximum(np.abs(p.hi), 1.0) * 1e-6)
        self._far_lo, self._far_hi = p.lo - span, p.hi + span
        h = _cusum_h(s.range_alarms_per_100k, 2 * n)
        self._range = _Cusum(
            np.array([s.range_null] * n + [s.far_null] * n),
            np.array([s.range_alt] * n + [s.far_alt] * n),
            h,
            s.clear_h,
        )
        self.windows = s.windows
        self._capacity = max(max(self.windows), s.stuck_rows) + _MAX_CHUNK
        self._bins = np.zeros((self._capacity, n), dtype=np.uint8)
        self._raw = np.zeros((self._capacity, n), dtype=np.float32)
        k = p.cuts.shape[1]
        self._k = k
        self._hist = np.zeros((len(self.windows), n, k + 1), dtype=np.int64)
        self._offsets = np.arange(n, dtype=np.int64) * (k + 1)
        self._start = np.zeros((len(self.windows), n), dtype=np.int64)
        """First row (global index) each window counts per feature, after a reset."""
        looks_per_row = 1.0 / s.check_rows
        shift_alpha = s.shift_alarms_per_100k / 100_000 / looks_per_row / (2 * n)
        drift_alpha = s.drift_alarms_per_100k / 100_000 / looks_per_row / n
        alphas = [shift_alpha] * len(s.shift_windows) + [drift_alpha]
        self._sizes = np.asarray(self.windows, dtype=np.int64)[:, None]
        self._c = np.asarray([math.sqrt(-0.5 * math.log(a / 2)) for a in alphas])[:, None]
        self._floors = np.asarray([*s.shift_floors, s.drift_floor])[:, None]
        self._min_rows = np.maximum((self._sizes * s.min_fill).astype(np.int64), 8)
        self._min_rows[-1] = s.drift_window
        self._window_alarm = np.zeros((len(self.windows), n), dtype=bool)
        stuck_alpha = s.stuck_alarms_per_100k / 100_000 / n
        self._stuck_alpha = stuck_alpha
        self._held = {kind: np.zeros(n, dtype=bool) for kind in KINDS[:4]}
        self._stuck_value = np.zeros(n, dtype=np.float64)
        """Which alerts this process holds, by kind and feature (mirrors ``active``)."""
        self.active: dict[str, dict[str, Any]] = {}
        """Alert id -> alert, for the alerts this process holds."""
        self._gross = np.zeros(n, dtype=bool)
        """Features in a gross episode (see ``_check_windows``)."""
        self._bound = np.zeros(n, dtype=bool)
        """Long-window alerts raised during an episode of the prediction prior."""
        self.external_episode = False
        """Set while an alert of another detector (the prediction prior, from the alert list) is
        active; ``end_episode`` once it is not."""

    # -- feeding ----------------------------------------------------------------------------

    def update(self, matrix: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Take a batch of rows (the spec's width); returns the alerts raised and the alerts
        cleared by it."""
        x = np.asarray(matrix, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        x = x[:, self.profile.columns]
        raised: list[dict[str, Any]] = []
        cleared: list[dict[str, Any]] = []
        for start in range(0, len(x), _MAX_CHUNK):
            r, c = self._step(x[start : start + _MAX_CHUNK])
            raised += r
            cleared += c
        return raised, cleared

    def _step(self, x: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        p, n = self.profile, len(x)
        first = self.rows_seen
        pos = (first + np.arange(n)) % self._capacity
        self._raw[pos] = x
        bins = bin_index(x, p.cuts)
        self._bins[pos] = bins
        self.rows_seen += n
        self._since_check += n
        self._count_windows(first, bins)

        events: dict[str, tuple[str, int]] = {}
        hits = np.concatenate(
            [(x < p.lo) | (x > p.hi), (x < self._far_lo) | (x > self._far_hi)], axis=1
        )
        up, down = self._range.update(hits)
        width = p.width
        range_on = self._range.alarm[:width] | self._range.alarm[width:]
        for f in np.flatnonzero((up[:width] | up[width:]) & range_on).tolist():
            events[self._id("feature_range", f)] = ("raised", f)
        for f in np.flatnonzero((down[:width] | down[width:]) & ~range_on).tolist():
            events[self._id("feature_range", f)] = ("cleared", f)
        self._check_unstuck(events)
        if self._since_check >= self.settings.check_rows:
            self._since_check = 0
            self._check_stuck(events)
            self._check_windows(events)
        return self._apply(events)

    def _count_windows(self, first: int, bins: np.ndarray) -> None:
        n, size = len(bins), self._hist[0].size
        offsets = self._offsets
        new = np.bincount((bins + offsets).ravel(), minlength=size).reshape(self._hist[0].shape)
        self._hist += new
        for w, width in enumerate(self.windows):
            lo, hi = max(first - width, 0), first + n - width  # rows leaving the window
            if hi <= lo:
                continue
            old = self._bins[np.arange(lo, hi) % self._capacity] + offsets
            start = self._start[w]
            if start.max() > lo:  # some features were reset: their older rows are not counted
                old = old[np.arange(lo, hi)[:, None] >= start[None, :]]
            self._hist[w] -= np.bincount(old.ravel(), minlength=size).reshape(new.shape)

    def _distances(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """KS distance at the training cuts, its threshold and the rows counted, per window
        and feature."""
        counted = np.minimum(self._sizes, self.rows_seen - self._start).clip(min=0)
        cum = np.cumsum(self._hist[:, :, : self._k], axis=2) / np.maximum(counted, 1)[..., None]
        p = self.profile
        dev = np.maximum(np.maximum(cum - p.cdf_hi, p.cdf_lo - cum), 0.0)
        root = np.sqrt(np.maximum(counted, 1))
        limit = np.maximum(self._c / (root + 0.12 + 0.11 / root), self._floors)
        return dev.max(axis=2), limit, counted

    def _check_windows(self, events: dict[str, tuple[str, int]]) -> None:
        s = self.settings
        d, limit, counted = self._distances()
        on = self._window_alarm
        self._window_alarm = (counted >= self._min_rows) & (
            d > np.where(on, limit * s.clear_ratio, limit)
        )
        # A gross episode of a feature (its shortest window far over its threshold, or a range
        # or stuck alert) ends once that window is well back under it: the slower windows,
        # full of the episode's rows, start afresh instead of holding alerts for hundreds of
        # rows more. The gap between the two levels keeps a shift that lasts from flapping.
        held = self._held["feature_range"] | self._held["feature_stuck"]
        short = d[0] * (counted[0] >= self._min_rows[0])
        self._gross |= held | (short > s.gross_on)
        for f in np.flatnonzero(self._gross & ~held & (short < s.gross_off)).tolist():
            self._gross[f] = False
            self.reset_windows(f, range(1, len(self.windows)))
        self._window_events(events, None)

    def _window_events(self, events: dict[str, tuple[str, int]], feature: int | None) -> None:
        nshift = len(self.settings.shift_windows)
        now = {
            "feature_shift": self._window_alarm[:nshift].any(axis=0),
            "feature_drift": self._window_alarm[-1],
        }
        for kind, on in now.items():
            changed = np.flatnonzero(on != self._held[kind]).tolist()
            for f in changed if feature is None else [feature] if feature in changed else []:
                events[self._id(kind, f)] = ("raised" if on[f] else "cleared", f)

    def _check_stuck(self, events: dict[str, tuple[str, int]]) -> None:
        """Raise: one value in most of the latest ``stuck_rows`` rows (judged with the
        windows)."""
        s, p = self.settings, self.profile
        m = s.stuck_rows
        if self.rows_seen < m:
            return
        recent = self._recent(m)
        ordered = np.sort(recent, axis=0)
        floor = max(math.ceil(s.stuck_min_share * m), 1)
        # A value seen ``floor`` times fills ``floor`` sorted places in a row: the exact screen.
        # (Counting adjacent ties let through every low-cardinality feature, each value far
        # too rare, and ``np.unique`` then ran per feature at every check: a millisecond a
        # step for traffic of a few distinct rows.)
        seen = (ordered[floor - 1 :] == ordered[: m - floor + 1]).any(axis=0)
        for f in np.flatnonzero(seen & ~self._held["feature_stuck"]).tolist():
            values, counts = np.unique(recent[:, f], return_counts=True)  # the screen passed
            top = int(np.argmax(counts))
            mass = p.mass_bound(f, float(values[top]))
            need = max(floor, _stuck_count(m, round(mass + 0.005, 2), self._stuck_alpha))
            latest = recent[-s.stuck_clear_rows :, f] == values[top]
            if counts[top] >= need and latest.sum() > 1:  # still stuck now: not just earlier
                self._stuck_value[f] = values[top]
                events[self._id("feature_stuck", f)] = ("raised", f)

    def _check_unstuck(self, events: dict[str, tuple[str, int]]) -> None:
        """Clear (at every step): the stuck value is at most once in the latest
        ``stuck_clear_rows`` rows, so a process that sees few rows clears after a dozen."""
        held = np.flatnonzero(self._held["feature_stuck"]).tolist()
        if not held:
            return
        recent = self._recent(min(self.settings.stuck_clear_rows, self.rows_seen))
        for f in held:
            if int((recent[:, f] == self._stuck_value[f]).sum()) <= 1:
                events[self._id("feature_stuck", f)] = ("cleared", f)

    def _recent(self, m: int) -> np.ndarray:
        idx = np.arange(self.rows_seen - m, self.rows_seen) % self._capacity
        return self._raw[idx].astype(np.float64)

    def reset_windows(self, f: int, windows: Iterable[int]) -> None:
        """Start the given windows of feature ``f`` afresh (they count rows from now)."""
        for w in windows:
            self._hist[w, f] = 0
            self._start[w, f] = self.rows_seen
            self._window_alarm[w, f] = False

    # -- alerts -----------------------------------------------------------------------------

    def _id(self, kind: str, f: int) -> str:
        return f"{kind}/{self.profile.names[f]}"

    def _apply(
        self, events: dict[str, tuple[str, int]]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        raised: list[dict[str, Any]] = []
        cleared: list[dict[str, Any]] = []
        last = len(self.windows) - 1
        while events:
            alert_id, (what, f) = min(events.items())
            del events[alert_id]
            kind = alert_id.split("/", 1)[0]
            if what == "raised" and alert_id not in self.active:
                if kind == "feature_drift" and self.external_episode:
                    self._bound[f] = True
                self._held[kind][f] = True
                alert = self.active[alert_id] = self._alert(kind, f)
                raised.append(alert)
            elif what == "cleared" and alert_id in self.active:
                cleared.append(self._figures(self.active.pop(alert_id), kind, f))
                self._held[kind][f] = False
                # The slower windows hold the broken rows the cleared alert was about: they
                # start afresh, and an alert they held clears with them.
                if kind in ("feature_range", "feature_stuck"):
                    self.reset_windows(f, range(last + 1))
                    self._window_events(events, f)
        return raised, cleared

    def end_episode(self, events: dict[str, tuple[str, int]] | None = None) -> list[dict[str, Any]]:
        """The prediction prior's alert is over: the long windows that alerted during it hold
        rows of that episode (a class-prior shift moves many features a little), so they start
        afresh and their alerts clear. With ``events``, the clears are queued there; else they
        are applied and returned."""
        queue: dict[str, tuple[str, int]] = {} if events is None else events
        for f in np.flatnonzero(self._bound).tolist():
            self._bound[f] = False
            self.reset_windows(f, [len(self.windows) - 1])
            self._window_events(queue, f)
        return [] if events is not None else self._apply(queue)[1]

    def _figures(self, alert: dict[str, Any], kind: str, f: int) -> dict[str, Any]:
        """The alert with its statistic as it stands now."""
        value, limit, rows = self._statistic(kind, f)
        return {**alert, "value": value, "threshold": limit, "rows": rows}

    def _statistic(self, kind: str, f: int) -> tuple[float, float, int]:
        s = self.settings
        if kind == "feature_range":
            m = min(self.rows_seen, 50)
            recent = self._recent(m)[:, f] if m else np.zeros(0)
            out = (recent < self.profile.lo[f]) | (recent > self.profile.hi[f])
            rate = float(out.mean()) if m else 0.0
            return round(rate, 4), s.range_null, m
        if kind == "feature_stuck":
            m = min(self.rows_seen, s.stuck_rows)
            recent = self._recent(m)[:, f]
            _, counts = np.unique(recent, return_counts=True) if m else (None, np.zeros(1))
            return round(float(counts.max()) / max(m, 1), 4), s.stuck_min_share, m
        ws = range(len(s.shift_windows)) if kind == "feature_shift" else [len(self.windows) - 1]
        d, limit, counted = self._distances()
        w = max(ws, key=lambda w: (counted[w, f] > 0, d[w, f] / limit[w, f]))
        return round(float(d[w, f]), 4), round(float(limit[w, f]), 4), int(counted[w, f])

    def _alert(self, kind: str, f: int) -> dict[str, Any]:
        value, limit, rows = self._statistic(kind, f)
        recent = self._recent(max(min(rows, self.rows_seen), 1))[:, f]
        since = change_point(recent)
        if kind == "feature_range":  # the rate since the change, not over a fixed span
            p = self.profile
            outside = (recent < p.lo[f]) | (recent > p.hi[f])
            # Raised within a few rows of the fault, the change point may not split them off
            # yet: the fault starts at the latest at the first value outside the range from
            # which on most values are (a stray one in normal traffic is not the start).
            tail_share = np.cumsum(outside[::-1])[::-1] / np.arange(len(outside), 0, -1)
            starts = np.flatnonzero(outside & (tail_share >= 0.5))
            if len(starts):
                since = max(since, int(starts[0]))
            changed = recent[since:]
            value = round(float(np.mean((changed < p.lo[f]) | (changed > p.hi[f]))), 4)
        else:
            changed = recent[since:]
        how = describe(self.profile, f, changed)
        what = {
            "feature_range": "share of values outside the training range",
            "feature_stuck": "share of the most frequent value",
            "feature_shift": "KS distance from training",
            "feature_drift": "KS distance from training",
        }[kind]
        return {
            "kind": kind,
            "feature": self.profile.names[f],
            "value": value,
            "threshold": limit,
            "rows": rows,
            "statistic": f"{what} over the last {rows if kind != 'feature_range' else len(changed)}"
            " rows",
            "described_rows": len(changed),
            "detail": f"{self.profile.names[f]}: {how.pop('detail')}",
            **how,
        }

    def summary(self, top: int = 3) -> list[dict[str, Any]]:
        """Per window, the features nearest their thresholds."""
        d, limit, counted = self._distances()
        out = []
        for w, size in enumerate(self.windows):
            for f in np.argsort(-(d[w] / limit[w]))[:top].tolist():
                if counted[w, f] == 0:
                    continue
                out.append({"feature": self.profile.names[f], "window": size,
                            "rows": int(counted[w, f]), "ks": round(float(d[w, f]), 4),
                            "threshold": round(float(limit[w, f]), 4)})  # fmt: skip
        return out


class PriorDetector:
    """Real's predicted class share against its training share: one-sided Bernoulli CUSUMs up
    and down, each tuned to a small and to a large shift (a CUSUM is quickest for the shift
    it is tuned to)."""

    def __init__(self, reference: float, settings: DetectorSettings | None = None):
        s = self.settings = settings or DetectorSettings()
        self.reference = ref = float(reference)
        eps = 1e-3
        p0, p1, negative = [], [], []
        for shift in s.prior_shifts:
            for counts_negatives, share in ((False, ref), (True, 1 - ref)):
                if share + shift < 1 - eps:  # the CUSUM counts rows of the class it watches
                    p0.append(share + s.prior_tolerance)
                    p1.append(share + shift)
                    negative.append(counts_negatives)
        self._negative = np.asarray(negative, dtype=bool)
        self._cusum = _Cusum(np.asarray(p0), np.asarray(p1), 0.0, s.clear_h)
        self._cusum.h = _cusum_h(s.prior_alarms_per_100k, len(p0))
        self.enabled = bool(p0)
        self.rows_seen = 0
        self._recent: list[bool] = []
        self.active: dict[str, Any] | None = None

    def update(self, positive: Sequence[bool] | np.ndarray) -> tuple[str | None, dict[str, Any]]:
        """Feed predicted labels (True = positive class); returns ("raised" | "cleared" | None,
        the alert)."""
        hits = np.asarray(positive, dtype=bool)
        if not len(hits) or not self.enabled:
            return None, {}
        self.rows_seen += len(hits)
        self._recent = (self._recent + hits.tolist())[-400:]
        self._cusum.update(hits[:, None] != self._negative[None, :])
        on = bool(self._cusum.alarm.any())
        if on and self.active is None:
            self.active = self.alert()
            return "raised", self.active
        if not on and self.active is not None:
            self.active = None
            return "cleared", self.alert()
        return None, {}

    def alert(self) -> dict[str, Any]:
        recent = np.asarray(self._recent, dtype=np.float64)
        recent = recent[change_point(recent, 16) :]
        share = float(np.mean(recent)) if len(recent) else 0.0
        way = "more" if share > self.reference else "fewer"
        return {
            "kind": "prediction_prior",
            "feature": None,
            "value": round(share, 4),
            "threshold": round(self.reference, 4),
            "rows": len(recent),
            "statistic": f"share of positive predictions over the last {len(recent)} rows",
            "detail": (
                f"real predicts the positive class for {share:.0%} of the last "
                f"{len(recent)} rows, {way} than the {self.reference:.0%} of its training "
                "scores"
            ),
        }
