"""The online drift detectors' vocabulary: their alert kinds and every constant they run with,
shared by the feature tests (``rendezvous.drift_detect``), the prediction prior
(``rendezvous.drift_prior``) and the alert list (``rendezvous.drift_alerts``), so that what each
setting means is written once, next to its default. (The drift monitor's thresholds on merged
windows of sketches are ``rendezvous.drift_alerts.Thresholds``.)

The online detectors are sequential tests on a stream of rows (the feature tests, run by the
log bin on every request it archives: ``models.feature_watch``) and of real's predicted labels
(the prior, run by each gateway process on its decisions), judged every few rows, so that a
broken feed is alerted within tens of rows instead of once a window of sketches has filled.

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
    spreads its values (an exact binomial tail against the most mass the training statistics
    allow on that value): a feature stuck at a constant, or sent as 0 for "missing". And partly
    stuck: one value in more of the latest ``repeat_rows`` rows than training allows any one
    value (at least ``repeat_min_share``), such as missing values filled with the training
    mean in a fifth of the rows, which moves no decile enough for the window tests.
``feature_shift``
    Per feature, a Kolmogorov-Smirnov statistic at the training deciles over the latest 100
    and 400 rows: a moderate shift, two columns swapped, a class-prior shift that moves inputs.
``feature_drift``
    The same over the latest 1,600 rows, with a floor on the effect: a subtle shift.
``prediction_prior``
    Two one-sided Bernoulli CUSUMs on real's predicted class (score >= 0.5) against the share
    of positives its training scores had, with an indifference zone of +-``prior_tolerance``;
    for a model of three classes or more, two on each class (its rows' arg max) against the
    share of its reference rows predicted as that class.

False alarms are budgeted per detector in alarms per 100,000 rows under the null (rows drawn
from the training distribution), and split over features and looks by Bonferroni: CUSUMs use
Wald's bound (an alarm within ``n`` rows has probability at most ``n * exp(-h)``), the window
tests the Kolmogorov-Smirnov tail at each look. Both are conservative; tests/test_drift_detect.py
measures the rates. Live traffic is never exactly the training distribution (a few hundred
held-out rows differ from training by a KS distance of up to ~0.09 per feature on the demo
data), so the window tests also need a minimum effect (``shift_floors``, ``drift_floor``):
statistically significant and big enough to matter.

Each raising test also clears by evidence, not by silence: a CUSUM alert clears when a reverse
CUSUM (the null against the alternative) crosses ``clear_h``; a window alert when its statistic
is back under ``clear_ratio`` of its threshold. When a gross alert (range, stuck) on a feature
clears, the slower windows of that feature start afresh: their content is the broken rows the
gross alert was about, and they would otherwise hold the feature in alert for thousands of rows
after the feed was fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS: tuple[str, ...] = (
    "feature_range",
    "feature_stuck",
    "feature_shift",
    "feature_drift",
    "prediction_prior",
)
"""Alert kinds of the online detectors (one alert per kind and feature)."""
GROSS_KINDS: tuple[str, ...] = ("feature_range", "feature_stuck")
"""Feature alerts whose clear starts the feature's windows afresh."""
WINDOW_KINDS: tuple[str, ...] = ("feature_shift", "feature_drift")
"""Feature alerts judged on those windows."""


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
    clear_ratio: float = 0.6
    """A window's alert clears once its statistic is back under this share of its threshold.
    At 0.8 a steady shift of many features a little (a class-mix change) hovered about the
    threshold, and its alerts cleared and were raised again within the same fault; at 0.6
    they hold, and a fixed feed clears about 15 % later (a helper's probe)."""
    gross_on: float = 0.4
    gross_off: float = 0.2
    """A feature's 100-row KS distance above ``gross_on`` starts a gross episode; back under
    ``gross_off``, the episode ends and the feature's slower windows start afresh."""
    prior_tolerance: float = 0.04
    """|predicted positive share - training's| up to this is normal..."""
    prior_shifts: tuple[float, ...] = (0.12, 0.25)
    """...and these are the shifts the prior CUSUMs are tuned to detect."""
    clear_h: float = math.log(20.0)
    """Reverse CUSUMs clear an alert once the evidence for the null is 20 to 1 (the prior's)."""
    range_clear_h: float = math.log(1e4)
    """The range CUSUM's clear: 10,000 to 1 for ``range_null`` against ``range_clear_alt``,
    175 rows in the range after a range alert. At 20 to 1 against ``range_alt`` (9 rows) a
    feed that stayed broken with a quarter of its rows out of range had such runs every
    hundred rows or so, and its alert (with the shift windows that a cleared range alert
    resets) was raised and cleared seven times in 1,000 rows."""
    far_clear_h: float = math.log(1e3)
    """The far one's: 1,000 to 1 for ``far_null`` against ``far_alt``, 141 rows within a range
    of the training range. At 20 to 1 (61 rows) a feed with a tenth of its rows garbage (far
    out in every feature at once) had such a run about once in 800 rows, and every feature's
    page alert cleared together and was raised again (a helper's probe)."""
    range_clear_alt: float = 0.08
    """The share of rows out of range that still holds a range alert: its clear weighs
    ``range_null`` against this, not ``range_alt``. Against 30 %, a feed with a tenth of its
    rows garbage sided with the null, and its page alerts cleared and were raised again within
    the fault, 153 times in 8,000 rows (a helper's probe); against 10 %, a feature that such
    garbage put out of its range in 6 % of rows still did, once in 1,500 rows."""
    stuck_clear_rows: int = 12
    repeat_rows: int = 600
    """The partly-stuck test's rows: on the demo, whose training allows any value 5 %, 20 % of
    the rows on one value are raised 320-384 rows into the fault and 10 % 576-2,112 (at 800:
    384-448 and 704-1,856; at 400: 192-320, and 10 % went unseen in half the runs)."""
    repeat_min_share: float = 0.05
    """Fewest of those rows on one value that is partly stuck, whatever training allows."""
    repeat_check_rows: int = 64
    """The partly-stuck test is judged every this many rows: a sort of its rows, about 1.2 us
    a row on the demo's 30 features (the detectors' other tests take about 2.2)."""
    repeat_clear_rows: int = 200
    """A partly-stuck alert clears once its value holds no more of the latest this many rows
    than training allows any value (at most 2 of them, if it allows none)."""

    @property
    def windows(self) -> tuple[int, ...]:
        return (*self.shift_windows, self.drift_window)
