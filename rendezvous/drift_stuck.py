"""The feature detectors' stuck tests (``rendezvous.drift_detect.FeatureDetectors``): one value
in most of the latest rows (stuck), or in more of them than training allows any one value
(partly stuck). Apart from the other tests because they count exact values, where those count
the training deciles' bins; they read the detectors' ring of latest rows (``LatestRows``) and
say which features to raise or clear, the detectors keeping the alerts.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from rendezvous.drift_profile import FeatureProfile
from rendezvous.drift_settings import DetectorSettings
from rendezvous.drift_stats import stuck_count

Event = tuple[str, int]
"""("raised" or "cleared", feature)."""


class LatestRows(Protocol):
    """The detectors' ring of the latest rows."""

    rows_seen: int

    def latest(self, m: int, as_kept: bool = False) -> np.ndarray:
        """The latest ``m`` rows (float64; ``as_kept``: float32, as the ring holds them)."""
        ...


class StuckTests:
    """Per feature: the stuck value of a held stuck alert, and whether the partly-stuck test
    raised it (then it clears by that test's rule)."""

    def __init__(self, profile: FeatureProfile, settings: DetectorSettings, rows: LatestRows):
        n = profile.width
        self.profile = profile
        self.settings = settings
        self.rows = rows
        self.alpha = settings.stuck_alarms_per_100k / 100_000 / n
        self.value = np.zeros(n, dtype=np.float64)
        self.partly = np.zeros(n, dtype=bool)
        """Alerts raised by the partly-stuck test (``repeat_rows``), which clear by it."""
        self.partly_need = np.zeros(n, dtype=np.float64)
        self.counted_from = np.zeros(n, dtype=np.int64)
        """First row the partly-stuck test counts per feature (after a stuck alert cleared)."""
        self._since_partly = 0

    # -- stuck: most of the latest rows on one value ---------------------------------------

    def raised(self, held: np.ndarray) -> list[Event]:
        """One value in most of the latest ``stuck_rows`` rows (judged with the windows)."""
        s, p = self.settings, self.profile
        m = s.stuck_rows
        if self.rows.rows_seen < m:
            return []
        recent = self.rows.latest(m)
        ordered = np.sort(recent, axis=0)
        floor = max(math.ceil(s.stuck_min_share * m), 1)
        # A value seen ``floor`` times fills ``floor`` sorted places in a row: the exact screen.
        # (Counting adjacent ties let through every low-cardinality feature, each value far
        # too rare, and ``np.unique`` then ran per feature at every check: a millisecond a
        # step for traffic of a few distinct rows.)
        seen = (ordered[floor - 1 :] == ordered[: m - floor + 1]).any(axis=0)
        events = []
        for f in np.flatnonzero(seen & ~held).tolist():
            values, counts = np.unique(recent[:, f], return_counts=True)  # the screen passed
            top = int(np.argmax(counts))
            mass = p.mass_bound(f, float(values[top]))
            need = max(floor, stuck_count(m, round(mass + 0.005, 2), self.alpha))
            latest = recent[-s.stuck_clear_rows :, f] == values[top]
            if counts[top] >= need and latest.sum() > 1:  # still stuck now: not just earlier
                self.value[f] = values[top]
                events.append(("raised", f))
        return events

    def cleared(self, held: np.ndarray) -> list[Event]:
        """At every step: the stuck value is at most once in the latest ``stuck_clear_rows``
        rows, so a process that sees few rows clears after a dozen. (A feed still partly stuck
        is raised again by the partly-stuck test, from the rows after.)"""
        features = np.flatnonzero(held & ~self.partly).tolist()
        if not features:
            return []
        recent = self.rows.latest(min(self.settings.stuck_clear_rows, self.rows.rows_seen))
        return [("cleared", f) for f in features
                if int((recent[:, f] == self.value[f]).sum()) <= 1]  # fmt: skip

    # -- partly stuck: more of the latest rows on one value than training allows ------------

    def partly_due(self, rows: int) -> bool:
        """Count ``rows`` more; whether the partly-stuck test is due (``repeat_check_rows``)."""
        self._since_partly += rows
        if self._since_partly < self.settings.repeat_check_rows:
            return False
        self._since_partly = 0
        return True

    def partly_events(self, held: np.ndarray) -> list[Event]:
        """Raise: one value in more of the latest ``repeat_rows`` rows than training allows any
        one value, and still in the latest ``repeat_clear_rows``; clear the partly-stuck alerts
        whose value is not. A feature counts only the rows since its last stuck alert cleared:
        the rows of that fault are no evidence."""
        s, seen = self.settings, self.rows.rows_seen
        events: list[Event] = [("cleared", f) for f in np.flatnonzero(held & self.partly).tolist()
                               if not self.still_partly(f, self.value[f])]  # fmt: skip
        m = min(s.repeat_rows, seen)
        if m < s.repeat_clear_rows:
            return events
        recent = self.rows.latest(m, as_kept=True)  # float32: a sort of half the bytes
        counted = np.minimum(seen - self.counted_from, m)
        # A value on ``floor`` rows fills ``floor`` sorted places in a row: the screen (exact
        # counts only for the columns it passes, and those whose rows are cut short)
        floor = max(math.ceil(s.repeat_min_share * m), 2)
        ordered = np.sort(recent, axis=0)
        screen = (ordered[floor - 1 :] == ordered[: m - floor + 1]).any(axis=0) | (counted < m)
        for f in np.flatnonzero(screen & ~held).tolist():
            rows = int(counted[f])
            if rows < s.repeat_clear_rows:
                continue
            values, counts = np.unique(recent[-rows:, f], return_counts=True)
            count, value = int(counts.max()), float(values[int(counts.argmax())])
            least = max(math.ceil(s.repeat_min_share * rows), 2)
            mass = self.profile.mass_bound(f, value)
            need = max(least, stuck_count(rows, round(mass + 0.005, 2), self.alpha))
            if count >= need and self.still_partly(f, value):
                self.value[f] = value
                self.partly[f] = True
                self.partly_need[f] = need / rows
                events.append(("raised", f))
        return events

    def still_partly(self, f: int, value: float) -> bool:
        """``value`` holds more of the latest ``repeat_clear_rows`` rows than training allows
        it (at least 2)."""
        m = min(self.settings.repeat_clear_rows, self.rows.rows_seen)
        allowed = max(2, math.floor(self.profile.mass_bound(f, value) * m))
        return int((self.rows.latest(m)[:, f] == value).sum()) > allowed

    def released(self, f: int) -> None:
        """The feature's stuck alert cleared: the partly-stuck test counts from now."""
        self.partly[f] = False
        self.counted_from[f] = self.rows.rows_seen

    # -- what an alert says ------------------------------------------------------------------

    def statistic(self, f: int) -> tuple[float, float, int]:
        """(share, threshold, rows) of the test that holds the feature's alert."""
        s, seen = self.settings, self.rows.rows_seen
        if self.partly[f]:
            m = min(seen, s.repeat_rows)
            share = float(np.mean(self.rows.latest(m)[:, f] == self.value[f])) if m else 0.0
            return round(share, 4), round(float(self.partly_need[f]), 4), m
        m = min(seen, s.stuck_rows)
        recent = self.rows.latest(m)[:, f]
        _, counts = np.unique(recent, return_counts=True) if m else (None, np.zeros(1))
        return round(float(counts.max()) / max(m, 1), 4), s.stuck_min_share, m

    def partly_words(self, f: int, share: float, rows: int) -> str:
        """A partly-stuck alert's words: the share of late, not only of the whole window
        (raised at 7 % of 800 rows, a fifth of the rows since the fault began)."""
        stuck = self.value[f]
        late = self.rows.latest(min(self.settings.repeat_clear_rows, self.rows.rows_seen))[:, f]
        allowed = self.profile.mass_bound(f, stuck)
        return (
            f"{stuck:.6g} in {np.mean(late == stuck):.0%} of the last {len(late)} rows "
            f"({share:.0%} of the last {rows}), where training holds at most "
            f"{allowed * 100:.2g}% on any one value (partly stuck: missing values filled "
            "with a constant?)"
        )
