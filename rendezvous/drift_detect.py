"""The online feature detectors of one deployment (``FeatureDetectors``: range, stuck, shift
and drift, per feature), run by the log bin on every request it archives
(``models.feature_watch``): a ring of the latest rows, the training-quantile bin counts of each
window, and the alerts they raise and clear. What each kind tests, its false-alarm budget and
how it clears: ``rendezvous.drift_settings``; the sums: ``rendezvous.drift_stats``; the stuck
tests, which count exact values: ``rendezvous.drift_stuck``; the training reference and the
words of an alert: ``rendezvous.drift_profile``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rendezvous.drift_profile import FeatureProfile, change_point, describe
from rendezvous.drift_settings import GROSS_KINDS, KINDS, WINDOW_KINDS, DetectorSettings
from rendezvous.drift_stats import Cusum, cusum_h
from rendezvous.drift_stuck import Event, StuckTests
from rendezvous.quantile_bins import bin_index

MIN_DESCRIBED = 6
"""Fewest rows a range alert's words describe (a gross fault raises within 6 to 9 rows)."""

_MAX_CHUNK = 256
"""Rows handled in one step; a bigger batch is cut (the ring must hold a window and a step)."""


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
        h = cusum_h(s.range_alarms_per_100k, 2 * n)
        self._range = Cusum(
            np.array([s.range_null] * n + [s.far_null] * n),
            np.array([s.range_alt] * n + [s.far_alt] * n),
            h,
            np.array([s.range_clear_h] * n + [s.far_clear_h] * n),
            np.array([s.range_clear_alt] * n + [s.far_alt] * n),
        )
        self.windows = s.windows
        self._capacity = max(max(self.windows), s.stuck_rows, s.repeat_rows) + _MAX_CHUNK
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
        self._held = {kind: np.zeros(n, dtype=bool) for kind in KINDS[:4]}
        """Which alerts this process holds, by kind and feature (mirrors ``active``)."""
        self._stuck = StuckTests(p, s, self)
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
        stuck, held = self._stuck, self._held["feature_stuck"].copy()
        self._stuck_events(events, stuck.cleared(held))
        checked = self._since_check >= self.settings.check_rows
        if checked:  # the stuck test first: a feed stuck whole is not "partly stuck" (a probe)
            self._since_check = 0
            for what, f in stuck.raised(held):
                events[self._id("feature_stuck", f)] = (what, f)
                held[f] = True
        if stuck.partly_due(n):
            self._stuck_events(events, stuck.partly_events(held))
        if checked:
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

    def _stuck_events(self, events: dict[str, tuple[str, int]], found: list[Event]) -> None:
        for what, f in found:
            events[self._id("feature_stuck", f)] = (what, f)

    def latest(self, m: int, as_kept: bool = False) -> np.ndarray:
        """The latest ``m`` rows (float64; ``as_kept``: float32, as the ring holds them)."""
        idx = np.arange(self.rows_seen - m, self.rows_seen) % self._capacity
        return self._raw[idx] if as_kept else self._raw[idx].astype(np.float64)

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
                if kind == "feature_stuck":
                    self._stuck.released(f)
                # The windows hold the broken rows the cleared alert was about: they start
                # afresh, and an alert they held clears with them (which is why a range alert
                # must not clear while the feed is still broken: ``range_clear_h``).
                if kind in GROSS_KINDS:
                    self.reset_windows(f, range(last + 1))
                    self._window_events(events, f)
        return raised, cleared

    def inherit(self, alerts: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Take standing ``feature_range`` alerts of an earlier run of this source (a restarted
        log bin's claim) as this detector's own; returns the ids taken. Both of the feature's
        CUSUMs stand in alarm with their reverse walks at zero, so the alert clears on this
        detector's evidence that the feed is back in range (about 175 rows, as its own alerts
        clear) and stands while it is not: no raise meanwhile, since an alarm stands. Held for
        a fixed 1,600 rows instead, a fixed feed kept a restarted bin's page alert ~1,600
        requests. Other kinds are left: their tests' state (a stuck value, a window's rows) is
        not in the claim (window alerts are taken once the windows are full:
        ``inherit_windows``)."""
        taken = []
        width = self.profile.width
        for alert_id, alert in alerts.items():
            kind, _, name = alert_id.partition("/")
            if kind != "feature_range" or name not in self.profile.names or alert_id in self.active:
                continue
            f = self.profile.names.index(name)
            columns = np.array([f, f + width])
            self._range.alarm[columns] = True
            self._range.back[columns] = 0.0
            self._held[kind][f] = True
            self.active[alert_id] = {**alert, "kind": kind, "feature": name}
            taken.append(alert_id)
        return taken

    def inherit_windows(
        self, alerts: Mapping[str, Mapping[str, Any]], force: bool = False
    ) -> list[str]:
        """Take held ``feature_shift`` / ``feature_drift`` alerts of an earlier run as this
        detector's own, once its windows are full (a restarted bin's hold ends): their alarms
        stand, so each clears only when its windows fall under the clear level (``clear_ratio``
        of the threshold), as its own do, and stands otherwise. Released instead, a subtle
        shift still on, whose full window was between the two levels, got a "resolved" and
        a "firing" again rows later. One whose windows started afresh since (a gross episode
        of the feature ended) is left until they are judged again (``force``: taken anyway).
        Returns the ids taken (one already active is taken as is)."""
        taken = []
        nshift = len(self.settings.shift_windows)
        for alert_id, alert in alerts.items():
            kind, _, name = alert_id.partition("/")
            if kind not in WINDOW_KINDS or name not in self.profile.names:
                continue
            f = self.profile.names.index(name)
            ws = range(nshift) if kind == "feature_shift" else [len(self.windows) - 1]
            if alert_id in self.active:
                taken.append(alert_id)
                continue
            counted = np.minimum(self._sizes, self.rows_seen - self._start).clip(min=0)
            if not all(counted[w, f] >= self._min_rows[w] for w in ws) and not force:
                continue  # windows started afresh since (a gross episode ended): not yet
            taken.append(alert_id)
            for w in ws:
                self._window_alarm[w, f] = True
            self._held[kind][f] = True
            self.active[alert_id] = {**alert, "kind": kind, "feature": name}
        return taken

    def check_now(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """A look at the windows now, between the looks every ``check_rows`` rows (for the
        alerts ``inherit_windows`` just took); returns the alerts raised and cleared."""
        events: dict[str, tuple[str, int]] = {}
        self._check_windows(events)
        return self._apply(events)

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
        """The alert with its statistic as it stands now; none when its windows hold no row
        (started afresh as another alert of the feature cleared: an empty window's distance,
        0.9 against 2.4, was shown as the figure the alert cleared at)."""
        value, limit, rows = self._statistic(kind, f)
        if rows == 0:
            return {**alert, "value": None, "threshold": None, "rows": 0}
        return {**alert, "value": value, "threshold": limit, "rows": rows}

    def figures_now(self, alerts: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """What these detectors read now of each alert (by id, ``kind/feature``), as the figures
        it clears with: for alerts they did not raise themselves (a restarted bin's held ones)."""
        out: dict[str, dict[str, Any]] = {}
        for alert_id, alert in alerts.items():
            kind, _, name = alert_id.partition("/")
            if name not in self.profile.names or kind not in self._held:
                out[alert_id] = {"value": None, "threshold": None}
                continue
            now = self._figures(dict(alert), kind, self.profile.names.index(name))
            out[alert_id] = {"value": now["value"], "threshold": now["threshold"]}
        return out

    def _statistic(self, kind: str, f: int) -> tuple[float, float, int]:
        s = self.settings
        if kind == "feature_range":
            m = min(self.rows_seen, 50)
            recent = self.latest(m)[:, f] if m else np.zeros(0)
            out = (recent < self.profile.lo[f]) | (recent > self.profile.hi[f])
            rate = float(out.mean()) if m else 0.0
            return round(rate, 4), s.range_null, m
        if kind == "feature_stuck":
            return self._stuck.statistic(f)
        ws = range(len(s.shift_windows)) if kind == "feature_shift" else [len(self.windows) - 1]
        d, limit, counted = self._distances()
        w = max(ws, key=lambda w: (counted[w, f] > 0, d[w, f] / limit[w, f]))
        return round(float(d[w, f]), 4), round(float(limit[w, f]), 4), int(counted[w, f])

    def _alert(self, kind: str, f: int) -> dict[str, Any]:
        value, limit, rows = self._statistic(kind, f)
        recent = self.latest(max(min(rows, self.rows_seen), 1))[:, f]
        since = change_point(recent)
        if kind == "feature_range":  # the rate since the change, not over a fixed span
            p = self.profile
            outside = (recent < p.lo[f]) | (recent > p.hi[f])
            # Raised within a few rows of the fault, the change point may not split them off
            # yet: the fault starts at the latest at the first value outside the range from
            # which on most values are (a stray one in normal traffic is not the start).
            # A tail of a few rows is no start: a feed with a tenth of its rows garbage was
            # described by its last 2-4 rows ("75% above the training max"; a probe).
            tail = np.arange(len(outside), 0, -1)
            tail_share = np.cumsum(outside[::-1])[::-1] / tail
            starts = np.flatnonzero(outside & (tail_share >= 0.5) & (tail >= MIN_DESCRIBED))
            if len(starts):
                since = max(since, int(starts[0]))
            since = min(since, max(len(recent) - MIN_DESCRIBED, 0))
            changed = recent[since:]
            value = round(float(np.mean((changed < p.lo[f]) | (changed > p.hi[f]))), 4)
            rows = len(changed)
        elif kind == "feature_stuck" and self._stuck.partly[f]:
            changed = recent  # a share of the rows throughout: no start to split off
        else:
            changed = recent[since:]
        how = describe(self.profile, f, changed)
        if kind == "feature_stuck" and self._stuck.partly[f]:
            how["detail"] = f"{self._stuck.partly_words(f, value, rows)}; {how['detail']}"
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
            "statistic": f"{what} over the last {rows} rows",
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
