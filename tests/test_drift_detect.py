"""The online drift detectors on synthetic streams and on the demo data: pure, seeded, seconds.

Calibration: under the null (rows drawn from the distribution the training statistics describe)
each detector raises no more alarms than its budget says, measured with budgets loose enough
for alarms to happen; at the default budgets, none at all. Power: each kind of fault is raised
within the delay the module states, naming the feature and saying how it moved, and clears
once the rows are normal again."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binom, kstwo

from models.train import demo_data, training_stats
from rendezvous.drift_detect import FeatureDetectors
from rendezvous.drift_prior import PriorDetector
from rendezvous.drift_profile import FeatureProfile, change_point, describe
from rendezvous.drift_settings import DetectorSettings
from rendezvous.drift_stats import Cusum, binomial_tail, ks_critical
from rendezvous.spec import FeatureSpec, FeatureStats

WIDTH = 8
NAMES = tuple(f"f{i}" for i in range(WIDTH))
SCALES = np.array([1.0, 10.0, 0.01, 250.0, 3.0, 0.5, 40.0, 7.0])
LOOSE = DetectorSettings(
    range_alarms_per_100k=500.0,
    stuck_alarms_per_100k=500.0,
    shift_alarms_per_100k=500.0,
    drift_alarms_per_100k=500.0,
    shift_floors=(0.0, 0.0),
    drift_floor=0.0,
)
"""Budgets of 5 alarms per 1,000 rows and no effect floor: the thresholds alone decide."""


def draw(rng: np.random.Generator, rows: int) -> np.ndarray:
    """Synthetic features of assorted scales: lognormal and normal columns."""
    z = rng.standard_normal((rows, WIDTH))
    x = np.where(np.arange(WIDTH) % 2 == 0, np.exp(0.5 * z), 5.0 + z)
    return x * SCALES


def spec_of(x: np.ndarray, names: tuple[str, ...] = NAMES) -> FeatureSpec:
    return FeatureSpec(names=names, stats=training_stats(list(names), x))


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    """Statistics of 200,000 rows: the deciles are those of the distribution itself."""
    return spec_of(draw(np.random.default_rng(12345), 200_000))


@pytest.fixture(scope="module")
def profile(spec: FeatureSpec) -> FeatureProfile:
    p = FeatureProfile.from_spec(spec)
    assert p is not None
    return p


def feed(
    det: FeatureDetectors, x: np.ndarray, batch: int = 16
) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """Rows in batches; the raises and clears with the count of rows fed when they came."""
    raised, cleared = [], []
    for start in range(0, len(x), batch):
        r, c = det.update(x[start : start + batch])
        at = min(start + batch, len(x))
        raised += [(at, a) for a in r]
        cleared += [(at, a) for a in c]
    return raised, cleared


# -- the statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [100, 400, 1600])
@pytest.mark.parametrize("alpha", [1e-3, 1e-6, 5e-8])
def test_ks_critical_value_is_the_exact_tail(n: int, alpha: float) -> None:
    assert float(ks_critical(n, alpha)) == pytest.approx(kstwo.isf(alpha, n), rel=3e-3)
    assert float(ks_critical(20, alpha)) >= kstwo.isf(alpha, 20)  # conservative when small


@pytest.mark.parametrize(
    ("k", "n", "p"), [(20, 40, 0.1), (5, 40, 0.03), (1, 40, 0.5), (40, 40, 0.9)]
)
def test_binomial_tail_is_scipys(k: int, n: int, p: float) -> None:
    assert binomial_tail(k, n, p) == pytest.approx(binom.sf(k - 1, n, p), rel=1e-9)


def test_change_point_finds_where_values_moved() -> None:
    rng = np.random.default_rng(3)
    for later in (20, 50, 80):
        values = np.concatenate([rng.normal(size=100 - later), rng.normal(size=later) * 5 + 20])
        assert abs(change_point(values) - (100 - later)) <= 2
    assert [change_point(rng.normal(size=100)) for _ in range(20)] == [0] * 20
    # ties share their mean rank: a value stuck above the median is a change, not an order
    stuck = np.concatenate([rng.normal(size=70), np.full(30, 1.5)])
    assert abs(change_point(stuck) - 70) <= 2
    assert change_point(np.full(100, 1.5)) == 0


def test_cusum_false_alarm_rate_is_within_walds_bound() -> None:
    """Bernoulli streams at exactly the null rate: alarms per row at most exp(-h)."""
    h = math.log(500.0)
    rows, streams = 20_000, 40
    rng = np.random.default_rng(0)
    cusum = Cusum(np.full(streams, 0.05), np.full(streams, 0.3), h, math.log(100))
    alarms = 0
    for _ in range(0, rows, 50):
        raised, _ = cusum.update(rng.random((50, streams)) < 0.05)
        alarms += int(raised.sum())
        cusum.reset(np.flatnonzero(cusum.alarm))  # count each alarm, then start again
    rate = alarms / (rows * streams)
    assert rate <= math.exp(-h)
    assert rate >= math.exp(-h) / 50  # a bound, but not a vacuous one


def test_cusum_raises_fast_on_a_high_rate_and_clears_on_the_null() -> None:
    h = math.log(1e7)
    cusum = Cusum(np.array([0.03]), np.array([0.3]), h, math.log(100))
    up = [i for i in range(40) if cusum.update(np.array([[True]]))[0][0]]
    assert up and up[0] < h / math.log(10) + 1  # ln(0.3/0.03) of evidence per row
    down = [i for i in range(100) if cusum.update(np.array([[False]]))[1][0]]
    assert down and down[0] < 20  # ln(100) / ln(0.97/0.7) rows of normal data
    assert not cusum.alarm[0]


def _page_walk(start: np.ndarray, inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Page's recursion s = max(0, s + inc), one row at a time: the end and the highest."""
    s, peak = start.copy(), np.zeros_like(start)
    for row in inc:
        s = np.maximum(s + row, 0.0)
        peak = np.maximum(peak, s)
    return s, peak


def test_cusum_matches_pages_recursion_row_by_row() -> None:
    """The batched walks (quiet columns read off as a clipped line, busy ones summed, the
    reverse walk only where an alarm stands) against every column walked row by row: same
    raises, same clears, same sums, through bursts that raise and quiet spells that clear."""
    rng = np.random.default_rng(7)
    streams = 12
    p0, p1 = np.full(streams, 0.02), np.full(streams, 0.25)
    h, clear_h = math.log(1e4), math.log(100)
    cusum = Cusum(p0, p1, h, clear_h)
    up, down = np.log(p1 / p0), np.log((1 - p1) / (1 - p0))
    s, back, alarm = np.zeros(streams), np.zeros(streams), np.zeros(streams, dtype=bool)
    raises = clears = 0
    for batch in range(300):
        rate = np.where(np.arange(streams) < batch % 7, 0.6, 0.0) if batch % 40 < 10 else 0.01
        hits = rng.random((int(rng.integers(1, 40)), streams)) < rate
        inc = np.where(hits, up, down)
        s, peak = _page_walk(s, inc)
        s = np.minimum(s, 2 * h)
        want_raised = ~alarm & (peak > h)
        back[want_raised] = 0.0
        back, back_peak = _page_walk(back, -inc)
        want_cleared = alarm & (back_peak > clear_h)
        alarm = (alarm | want_raised) & ~want_cleared
        s[want_cleared] = 0.0
        back[~alarm] = 0.0

        raised, cleared = cusum.update(hits)
        assert raised.tolist() == want_raised.tolist()
        assert cleared.tolist() == want_cleared.tolist()
        assert cusum.alarm.tolist() == alarm.tolist()
        np.testing.assert_allclose(cusum.s, s, atol=1e-9)
        np.testing.assert_allclose(cusum.back, back, atol=1e-9)
        raises += int(raised.sum())
        clears += int(cleared.sum())
    assert raises > 5 and clears > 5


# -- calibration -------------------------------------------------------------------------------


def test_feature_false_alarm_rates_are_within_their_budgets(profile: FeatureProfile) -> None:
    """Loose budgets, no floors, 8 seeds of 25,000 null rows: every family's alarms per 100,000
    rows are at most its budget (Bonferroni and Wald are conservative), and some happen."""
    counts: dict[str, int] = {}
    rows = 0
    for seed in range(8):
        det = FeatureDetectors(profile, LOOSE)
        raised, _ = feed(det, draw(np.random.default_rng(seed), 25_000))
        rows += 25_000
        for _at, alert in raised:
            counts[alert["kind"]] = counts.get(alert["kind"], 0) + 1
    per_100k = {kind: n * 100_000 / rows for kind, n in counts.items()}
    budgets = {"feature_range": LOOSE.range_alarms_per_100k,
               "feature_stuck": LOOSE.stuck_alarms_per_100k,
               "feature_shift": LOOSE.shift_alarms_per_100k,
               "feature_drift": LOOSE.drift_alarms_per_100k}  # fmt: skip
    print("alarms per 100k null rows at loose budgets:", per_100k)
    for kind, rate in per_100k.items():
        assert rate <= budgets[kind], (kind, rate)
    assert counts.get("feature_shift", 0) > 0


def test_range_false_alarm_rate_at_the_edge_of_its_null(spec: FeatureSpec) -> None:
    """Training ranges narrowed to the 1.5th and 98.5th percentiles: 3 % of null rows fall
    outside, the rate the range CUSUMs take as still normal. Their alarms stay in budget."""
    x = draw(np.random.default_rng(7), 200_000)
    lo, hi = np.quantile(x, [0.015, 0.985], axis=0)
    stats = {}
    for i, (name, s) in enumerate(spec.stats.items()):
        low, high = float(lo[i]), float(hi[i])
        inside = {k: min(max(v, low), high) for k, v in s.quantiles.items()}
        stats[name] = FeatureStats(s.mean, s.std, low, high, inside)
    narrow = FeatureSpec(names=NAMES, stats=stats)
    profile = FeatureProfile.from_spec(narrow)
    assert profile is not None
    alarms, rows = 0, 0
    for seed in range(4):
        raised, _ = feed(
            FeatureDetectors(profile, LOOSE), draw(np.random.default_rng(seed), 25_000)
        )
        alarms += sum(a["kind"] == "feature_range" for _at, a in raised)
        rows += 25_000
    print("range alarms per 100k rows at the null's edge:", alarms * 100_000 / rows)
    assert 0 < alarms * 100_000 / rows <= LOOSE.range_alarms_per_100k


def test_default_budgets_raise_nothing_on_null_rows(profile: FeatureProfile) -> None:
    for seed in range(4):
        raised, _ = feed(FeatureDetectors(profile), draw(np.random.default_rng(100 + seed), 50_000))
        assert raised == []


@pytest.fixture(scope="module")
def demo() -> tuple[FeatureProfile, np.ndarray, np.ndarray]:
    d = demo_data()
    profile = FeatureProfile.from_spec(spec_of(d.x_train, tuple(d.names)))
    assert profile is not None
    return profile, d.x_test.astype(np.float64), np.vstack([d.x_train, d.x_test])


def test_held_out_demo_rows_raise_nothing(
    demo: tuple[FeatureProfile, np.ndarray, np.ndarray],
) -> None:
    """Traffic resampled from the 143 held-out rows differs from training by a KS distance of
    up to 0.09 per feature: the effect floors keep it quiet (100,000 rows, as two processes
    would judge them), and so does traffic from the whole data set."""
    profile, held_out, everything = demo
    for seed, rows in ((0, held_out), (1, held_out), (2, everything)):
        rng = np.random.default_rng(seed)
        raised, _ = feed(FeatureDetectors(profile), rows[rng.integers(0, len(rows), 50_000)])
        assert raised == [], [(at, a["kind"], a["feature"], a["value"]) for at, a in raised]


# -- power -------------------------------------------------------------------------------------


def faulty(
    profile: FeatureProfile,
    fault: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
    normal: int = 2000,
    broken: int = 600,
    after: int = 1000,
) -> tuple[dict[str, int], dict[str, dict], int | None]:
    """Feed normal rows, then ``broken`` rows through ``fault``, then normal rows. Returns the
    rows into the fault at which each kind was first raised, its first alert of each kind, and
    the rows after the fault until every alert had cleared."""
    rng = np.random.default_rng(seed)
    det = FeatureDetectors(profile)
    raised, _ = feed(det, draw(rng, normal))
    assert raised == []
    first: dict[str, int] = {}
    alerts: dict[str, dict] = {}
    raised, _ = feed(det, fault(draw(rng, broken)))
    for at, alert in raised:
        first.setdefault(alert["kind"], at)
        alerts.setdefault(alert["kind"], alert)
    clear_at = None
    x = draw(rng, after)
    for start in range(0, after, 16):
        det.update(x[start : start + 16])
        if not det.active and clear_at is None:
            clear_at = start + 16
    return first, alerts, clear_at


def column(f: int, how: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    def apply(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[:, f] = how(x[:, f])
        return x

    return apply


def test_a_unit_change_is_raised_within_a_few_rows_and_said_in_words(
    profile: FeatureProfile,
) -> None:
    first, alerts, cleared = faulty(profile, column(3, lambda v: v * 10))
    assert first["feature_range"] <= 32
    alert = alerts["feature_range"]
    assert alert["feature"] == "f3" and alert["value"] > 0.5
    assert "10 times larger than in training" in alert["detail"]
    assert cleared is not None and cleared <= 200  # the range clear: about 175 rows


@pytest.mark.parametrize(
    ("name", "fault", "kind", "rows"),
    [
        ("out of range", column(1, lambda v: v + 1e4), "feature_range", 32),
        ("negative sentinel", column(0, lambda v: np.full_like(v, -1.0)), "feature_range", 32),
        ("missing as zero", column(5, np.zeros_like), "feature_range", 32),
        ("stuck at the median", column(6, lambda v: np.full_like(v, 200.0)), "feature_stuck", 48),
        ("two columns swapped", lambda x: x[:, [0, 1, 2, 3, 4, 7, 6, 5]], "feature_range", 32),
    ],
)
def test_gross_faults_are_raised_within_tens_of_rows_and_clear(
    profile: FeatureProfile,
    name: str,
    fault: Callable[[np.ndarray], np.ndarray],
    kind: str,
    rows: int,
) -> None:
    first, _alerts, cleared = faulty(profile, fault)
    assert first.get(kind, 10**9) <= rows, (name, first)
    assert cleared is not None and cleared <= 250, (name, cleared)


def partly(f: int, share: float, value: float) -> Callable[[np.ndarray], np.ndarray]:
    """``share`` of the rows' feature ``f`` set to ``value`` (missing values filled)."""

    def apply(x: np.ndarray) -> np.ndarray:
        x = x.copy()
        x[np.random.default_rng(3).random(len(x)) < share, f] = value
        return x

    return apply


@pytest.mark.parametrize(("share", "most_mass", "rows"),
                         [(0.2, True, 450), (0.1, True, 600), (0.2, False, 900)])  # fmt: skip
def test_a_partly_stuck_feed_is_raised_said_and_clears(
    spec: FeatureSpec, share: float, most_mass: bool, rows: int
) -> None:
    """A fifth (a tenth) of the rows filled with the training mean moves no decile enough for
    the window tests, and went unseen over 2,000 requests (a helper's probe). The training's
    most frequent value bounds what one value may hold; statistics written before it have the
    deciles' bound alone (a tenth of the rows), which still sees a fifth."""
    if not most_mass:
        stats = {n: replace(st, most_mass=None) for n, st in spec.stats.items()}
        spec = replace(spec, stats=stats)
        assert "most_mass" not in spec.stats["f5"].to_dict()
    profile = FeatureProfile.from_spec(spec)
    assert profile is not None
    assert (profile.most_mass < 0.001).all() if most_mass else (profile.most_mass == 1.0).all()
    mean = float(profile.mean[5])
    first, alerts, cleared = faulty(profile, partly(5, share, mean), broken=1600, after=1000)
    assert set(first) == {"feature_stuck"} and first["feature_stuck"] <= rows, first
    alert = alerts["feature_stuck"]
    assert alert["feature"] == "f5" and alert["rows"] == 600, alert
    assert (
        alert["detail"].startswith(f"f5: {np.float32(mean):.6g} in ")
        and "partly" in alert["detail"]
    ), alert["detail"]
    assert cleared is not None and cleared <= 300, cleared


def test_a_stuck_feed_fixed_is_not_raised_again_as_partly_stuck(profile: FeatureProfile) -> None:
    """The rows of a fully stuck spell fill the partly-stuck test's 600: it counts only the
    rows after the spell's alert cleared, so the fixed feed stays quiet."""
    rng = np.random.default_rng(5)
    det = FeatureDetectors(profile)
    assert feed(det, draw(rng, 1000))[0] == []
    raised, _ = feed(det, column(6, lambda v: np.full_like(v, 200.0))(draw(rng, 600)))
    assert next(a["kind"] for _at, a in raised if a["feature"] == "f6") == "feature_stuck"
    after, cleared = feed(det, draw(rng, 1200))
    assert [a for _at, a in after if a["kind"] == "feature_stuck"] == [], after
    assert any(a["kind"] == "feature_stuck" for _at, a in cleared)


def test_a_feed_stuck_whole_is_not_called_partly_stuck(
    demo: tuple[FeatureProfile, np.ndarray, np.ndarray],
) -> None:
    """Both stuck tests judged in one step, the partly-stuck one first: a feed stuck whole was
    raised as "partly stuck" in 15 of 20 runs, and its words stayed so for the whole fault (a
    helper's live check)."""
    profile, _, everything = demo
    f = profile.names.index("mean texture")
    for seed in range(10):
        rng = np.random.default_rng(seed)
        det = FeatureDetectors(profile)
        feed(det, everything[rng.integers(0, len(everything), 1000)], batch=128)
        x = everything[rng.integers(0, len(everything), 400)].copy()
        x[:, f] = 19.0
        raised, _ = feed(det, x, batch=int(rng.integers(1, 129)))
        [stuck] = [a for _, a in raised if a["kind"] == "feature_stuck"]
        assert "partly" not in stuck["detail"] and "stuck at 19" in stuck["detail"], stuck


@pytest.mark.parametrize(("times", "stuck"), [(20, True), (19, False)])
def test_stuck_means_one_value_in_half_the_latest_rows_however_few_values_the_rest_take(
    profile: FeatureProfile, times: int, stuck: bool
) -> None:
    """The stuck test's screen is exact at its edge (20 of the latest 40 rows), and a feature
    of a few values that repeat, none in half the rows, is not stuck (nor does the screen
    then cost a count per feature)."""
    rng = np.random.default_rng(11)
    # the partly-stuck test rightly sees 17 values, each in 6 % of the rows, where training
    # spreads them: off here, where the short test's screen is what is measured
    det = FeatureDetectors(profile, DetectorSettings(repeat_check_rows=10**9))
    few = draw(rng, 17)[:, 6]
    x = draw(rng, 1000)
    x[:, 6] = few[rng.integers(0, len(few), len(x))]  # many repeats, each in ~6 % of rows
    raised, _ = feed(det, x)
    assert not [a for _at, a in raised if a["kind"] == "feature_stuck"]
    last = draw(rng, 40)
    last[:, 6] = few[np.arange(40) % 8]  # eight values, five times each...
    at = np.r_[np.arange(40 - times, 40, dtype=int)]
    last[at, 6] = 200.0  # ...then one value in the latest ``times`` rows
    got, _ = det.update(last)
    assert any(a["kind"] == "feature_stuck" and a["feature"] == "f6" for a in got) is stuck


def test_a_moderate_shift_is_raised_by_the_short_windows(profile: FeatureProfile) -> None:
    """One standard deviation up, on a normal feature: KS distance 0.38."""
    first, alerts, cleared = faulty(profile, column(1, lambda v: v + SCALES[1]))
    assert "feature_range" not in first
    assert first["feature_shift"] <= 160
    assert alerts["feature_shift"]["feature"] == "f1"
    assert "+1 training std" in alerts["feature_shift"]["detail"]
    assert cleared is not None and cleared <= 450


def test_a_subtle_shift_is_raised_by_the_long_window(profile: FeatureProfile) -> None:
    """A 25 % scale of a lognormal feature (KS distance 0.18 against training: under the short
    windows' floors) within the long window's 1,600 rows."""
    first, alerts, _ = faulty(profile, column(4, lambda v: v * 1.25), broken=2500, after=0)
    assert "feature_drift" in first and "feature_range" not in first
    assert first["feature_drift"] <= 1600
    assert alerts["feature_drift"]["feature"] == "f4"


def test_a_feed_that_stays_broken_holds_its_range_alert(profile: FeatureProfile) -> None:
    """A quarter of one feature's rows just past the training max, for 1,600 rows: one alert,
    held. Its reverse CUSUM cleared on any run of 9 rows in range (20 to 1), and each clear
    reset the shift windows: seven raises and clears in 1,000 rows of a helper's probe."""
    rng = np.random.default_rng(3)
    det = FeatureDetectors(profile)
    feed(det, draw(rng, 2000))
    x = draw(rng, 1600)
    f = 1
    past = rng.random(len(x)) < 0.25
    x[past, f] = profile.hi[f] + 0.1 * (profile.hi[f] - profile.lo[f])  # out, but not far
    raised, cleared = feed(det, x)
    ranges = [at for at, a in raised if a["kind"] == "feature_range"]
    assert len(ranges) == 1 and ranges[0] <= 100, ranges
    assert not [a for _, a in cleared if a["feature"] == NAMES[f]], cleared


def test_a_tenth_of_the_rows_garbage_holds_its_range_alerts_and_a_fixed_feed_clears(
    profile: FeatureProfile,
) -> None:
    """A tenth of the rows garbage in every feature, for 800 rows, five feeds: the range alerts
    stand until the feed is fixed. Their clear weighed 3 % against 30 % out of range, between
    which a tenth sides with 3 %: 160 clears and 153 raises again in a helper's probe, each a
    page "back under its threshold" while a tenth of the rows was still garbage."""
    flaps = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        det = FeatureDetectors(profile)
        feed(det, draw(rng, 800), batch=8)
        x = draw(rng, 800)
        bad = rng.random(len(x)) < 0.10
        x[bad] = rng.uniform(-1000, 10_000, (int(bad.sum()), WIDTH))
        raised, cleared = feed(det, x, batch=8)
        ranges = [a for _, a in raised if a["kind"] == "feature_range"]
        assert {a["feature"] for a in ranges} == set(NAMES)
        # described by at least a few rows, as its fields say (the last 2-4 rows read as
        # "75% above the training max", its rows field saying 50; a probe)
        assert all(a["described_rows"] == a["rows"] >= 6 for a in ranges), ranges
        flaps += sum(a["kind"] == "feature_range" for _, a in cleared)
        _, cleared = feed(det, draw(rng, 400), batch=8)
        at = [n for n, a in cleared if a["kind"] == "feature_range"]
        assert len(at) == WIDTH and max(at) <= 200, at  # fixed: every one clears
        assert not det.active, det.active
    assert flaps == 0


def test_a_steady_shift_of_the_class_mix_holds_its_alerts(
    demo: tuple[FeatureProfile, np.ndarray, np.ndarray],
) -> None:
    """Rows of one class only, for 3,000 rows: many features shift a little, and their shift
    statistic hovers about the threshold. Cleared at 80 % of it, alerts were cleared and raised
    again in the same steady fault (a resolved and a firing each time: 12 re-raises over these
    six runs; a helper's probe saw 6 in 3,000 requests). At 60 % they hold."""
    profile = demo[0]
    d = demo_data()
    x, y = np.vstack([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test])
    again = 0
    for klass in (0, 1):
        rows = x[y == klass]
        for seed in range(3):
            rng = np.random.default_rng(seed)
            det = FeatureDetectors(profile)
            feed(det, x[rng.integers(0, len(x), 1000)], batch=50)
            raised, _ = feed(det, rows[rng.integers(0, len(rows), 3000)], batch=50)
            ids = [(a["kind"], a["feature"]) for _, a in raised]
            again += len(ids) - len(set(ids))
    assert again <= 1, again


def test_windows_start_afresh_when_a_gross_alert_clears(profile: FeatureProfile) -> None:
    """A long fault fills the long window; once the range alert clears, the long window holds
    no alert of that episode (else it would take 1,600 rows to empty)."""
    first, _, cleared = faulty(profile, column(2, lambda v: v * 100), broken=3000)
    assert {"feature_range", "feature_drift"} <= set(first)
    assert cleared is not None and cleared <= 200  # the range clear: about 175 rows


def test_an_episode_of_the_prior_ends_the_long_windows_it_held(profile: FeatureProfile) -> None:
    det = FeatureDetectors(profile)
    rng = np.random.default_rng(5)
    feed(det, draw(rng, 1000))
    det.external_episode = True  # the prediction prior is in alert
    raised, _ = feed(det, column(4, lambda v: v * 1.25)(draw(rng, 2000)))
    assert any(a["kind"] == "feature_drift" for _at, a in raised)
    det.external_episode = False
    cleared = det.end_episode()
    assert [a["kind"] for a in cleared] == ["feature_drift"]
    # its window started afresh: no figure to clear at (an empty window's read 0.9 > 2.4)
    assert cleared[0]["value"] is None and cleared[0]["rows"] == 0
    assert not any(a["kind"] == "feature_drift" for a in det.active.values())


# -- the prediction prior ----------------------------------------------------------------------


def test_prior_false_alarms_and_delays() -> None:
    rng = np.random.default_rng(1)
    det = PriorDetector(0.62)
    for _ in range(0, 200_000, 16):  # inside the tolerance: never raised
        what, _ = det.update(rng.random(16) < 0.60)
        assert what is None
    rows = 0
    while det.active is None:
        det.update(rng.random(16) < 0.30)
        rows += 16
    assert rows <= 200
    assert det.active["kind"] == "prediction_prior" and "fewer than the 62%" in det.active["detail"]
    rows = 0
    while det.active is not None:
        det.update(rng.random(16) < 0.62)
        rows += 16
    assert rows <= 400


def test_a_prior_clear_reads_the_share_of_the_rows_that_cleared_it() -> None:
    """The clear's figure came from one change point over the last 400 rows: after healthy |
    broken | fixed rows it split at the fault's start and read 0.31-0.36 (the broken and fixed
    rows' mean) against a reference of 0.62, and after a mild shift whose fixed rows were too
    few to stand out, 0.77-0.79 (a helper's live check): a "resolved" that read as broken."""
    off = []
    for seed in range(10):
        for broken, broken_rows in ((0.04, 104), (0.85, 304)):
            rng = np.random.default_rng(seed)
            det = PriorDetector(0.62)
            det.update(rng.random(152) < 0.62)
            for _ in range(broken_rows // 8):
                det.update(rng.random(8) < broken)
            if det.active is None:
                continue
            for _ in range(200):
                what, alert = det.update(rng.random(8) < 0.62)
                if what == "cleared":
                    off.append(abs(alert["value"] - 0.62))
                    break
    assert len(off) >= 15 and float(np.median(off)) < 0.06 and max(off) < 0.25, off


def test_a_prior_shift_that_stays_holds_its_alert_and_a_fixed_one_clears() -> None:
    """The large shift's CUSUM raised first and cleared on its own (a rate of 0.63 against its
    0.36 -> 0.61) before the small one had raised: a "resolved" and a "firing" within one
    fault in half the runs (a helper's probe). Every column now clears against the least
    shift that is still a fault."""
    flapped, clears = 0, []
    for ref, live in ((0.36, 0.63), (0.62, 0.85), (0.5, 0.7)):
        for seed in range(60):
            rng = np.random.default_rng(seed)
            det = PriorDetector(ref)
            events = [det.update(rng.random(8) < live)[0] for _ in range(250)]
            assert "raised" in events, (ref, live, seed)
            flapped += "cleared" in events
            for n in range(1, 60):
                if det.update(rng.random(8) < ref)[0] == "cleared":
                    clears.append(8 * n)
                    break
    assert flapped <= 2, flapped  # 81 of 180 before
    assert len(clears) == 180 and np.median(clears) <= 120, (len(clears), np.median(clears))


def test_prior_false_alarm_rate_is_within_its_budget() -> None:
    """At the edge of the tolerance (0.62 + 0.04) with a loose budget: Wald's bound holds."""
    settings = DetectorSettings(prior_alarms_per_100k=2000.0)
    alarms, rows = 0, 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        det = PriorDetector(0.62, settings)
        for _ in range(2000):
            what, _a = det.update(rng.random(16) < 0.66)
            alarms += what == "raised"
            rows += 16
            if det.active is not None:
                det = PriorDetector(0.62, settings)
    assert alarms * 100_000 / rows <= 2000.0


def test_a_multiclass_prior_is_watched_per_class_names_the_class_and_clears() -> None:
    """Each class's share against the share of the reference rows the model predicted as it
    (one-vs-rest CUSUMs up and down): quiet within the tolerance, raised on a class mix that
    moved, naming the class that moved most, cleared once the mix is back."""
    reference = [0.5, 0.3, 0.2]
    rng = np.random.default_rng(3)
    det = PriorDetector(reference, labels=["setosa", "versicolor", "virginica"])
    for _ in range(0, 100_000, 16):  # within the tolerance: never raised
        what, _ = det.update(rng.choice(3, 16, p=[0.47, 0.32, 0.21]))
        assert what is None
    rows = 0
    while det.active is None:  # virginica up 0.2 -> 0.45 (setosa down 0.15, versicolor 0.1)
        det.update(rng.choice(3, 16, p=[0.35, 0.2, 0.45]))
        rows += 16
        assert rows <= 400
    alert = det.active
    assert alert["kind"] == "prediction_prior" and alert["threshold"] == 0.2
    assert (
        "class virginica" in alert["detail"]
        and "more than the 20% of its reference rows" in (alert["detail"])
    )
    rows = 0
    while det.active is not None:
        det.update(rng.choice(3, 16, p=reference))
        rows += 16
        assert rows <= 800


def test_a_multiclass_prior_false_alarm_rate_is_within_its_budget() -> None:
    """Every class at the edge of its tolerance at once, with a loose budget: Wald's bound
    holds over the classes' columns."""
    settings = DetectorSettings(prior_alarms_per_100k=2000.0)
    reference = [0.5, 0.3, 0.2]
    alarms, rows = 0, 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        det = PriorDetector(reference, settings)
        for _ in range(2000):
            what, _a = det.update(rng.choice(3, 16, p=[0.46, 0.3, 0.24]))
            alarms += what == "raised"
            rows += 16
            if det.active is not None:
                det = PriorDetector(reference, settings)
    assert alarms * 100_000 / rows <= 2000.0


# -- the profile and the words -----------------------------------------------------------------


def test_profile_keeps_features_with_statistics_and_bounds_ties() -> None:
    quantiles = {"0.1": 0.0, "0.2": 0.0, "0.3": 0.0, "0.5": 1.0, "0.9": 2.0}
    spec = FeatureSpec(
        names=("a", "b", "c"),
        stats={
            "a": FeatureStats(mean=0.8, std=0.8, min=0.0, max=3.0, quantiles=quantiles),
            "c": FeatureStats(
                mean=1.0,
                std=1.0,
                min=-1.0,
                max=4.0,
                quantiles={"0.1": -0.5, "0.2": 0.0, "0.3": 0.3, "0.5": 1.0, "0.9": 2.5},
            ),
        },
    )
    p = FeatureProfile.from_spec(spec)
    assert p is not None and p.names == ("a", "c") and p.columns.tolist() == [0, 2]
    # a: 30 % of training at 0 (its minimum): nothing lies below it
    assert p.cdf_lo[0].tolist()[:3] == [0.0, 0.0, 0.0] and p.cdf_hi[0][:3].tolist() == [0, 0, 0]
    assert p.mass_bound(0, 0.0) == pytest.approx(0.5)  # up to the first cut above 0 (0.5)
    assert p.mass_bound(1, 0.1) == pytest.approx(0.1)
    assert p.mass_bound(1, 9.0) == 0.0
    out, count, distance = p.row_evidence(np.array([[0.0, 7.0, 1.0], [9.0, 7.0, -5.0]]))
    assert out.tolist() == [[False, False], [True, True]] and count.tolist() == [0, 2]
    assert distance[0] < distance[1]
    assert FeatureProfile.from_spec(FeatureSpec.from_names(["a"])) is None


def test_describe_says_how_values_moved(profile: FeatureProfile) -> None:
    rng = np.random.default_rng(0)
    x = draw(rng, 200)
    assert "10 times larger" in describe(profile, 3, x[:, 3] * 10)["detail"]
    assert "4 times smaller" in describe(profile, 3, x[:, 3] / 4)["detail"]
    stuck = describe(profile, 1, np.full(50, 42.0))["detail"]
    assert "stuck at 42 in 100% of rows" in stuck
    spread = describe(profile, 1, 50 + (x[:, 1] - 50) * 2)["detail"]
    assert "spread (10th to 90th percentile) x2" in spread
    assert "opposite sign" in describe(profile, 0, -x[:, 0])["detail"]
    # a feature centred on zero in training has no sign to lose (found by hand)
    centred = replace(profile, median=np.where(np.arange(len(profile.median)) == 0, -0.06,
                                               profile.median))  # fmt: skip
    said = describe(centred, 0, -x[:, 0])["detail"]
    assert "opposite sign" not in said and "times" not in said and "median" in said


def test_settings_are_a_plain_value() -> None:
    assert replace(DetectorSettings(), check_rows=32).windows == (100, 400, 1600)


def test_an_inherited_range_alert_clears_on_evidence_and_stands_while_broken(
    profile: FeatureProfile,
) -> None:
    """A restarted log bin's range alert, taken into its fresh detectors (``inherit``): it
    clears once they judge the feed back in range (as their own alerts do, about 175 rows),
    with figures of the rows they read, not after a fixed 1,600 rows; it stands without a
    raise or clear while a quarter of the rows stays out of range. Only range alerts of known
    features are taken (the others' tests keep a state the claim has not)."""
    old = {"kind": "feature_range", "feature": NAMES[1], "value": 1.0, "threshold": 0.03}
    claim = {f"feature_range/{NAMES[1]}": old, "feature_stuck/f2": {"kind": "feature_stuck"},
             "feature_range/gone": {"kind": "feature_range"}}  # fmt: skip
    for seed in range(5):
        rng = np.random.default_rng(seed)
        det = FeatureDetectors(profile)
        assert det.inherit(claim) == [f"feature_range/{NAMES[1]}"]
        assert set(det.active) == {f"feature_range/{NAMES[1]}"}
        raised, cleared = feed(det, draw(rng, 1600))
        assert raised == [] and len(cleared) == 1, (raised, cleared)
        at, alert = cleared[0]
        assert 100 < at <= 400, at
        assert alert["value"] < 0.03 and alert["rows"] == 50, alert

        det = FeatureDetectors(profile)
        det.inherit(claim)
        x = draw(rng, 3200)
        past = rng.random(len(x)) < 0.25
        x[past, 1] = profile.hi[1] + 0.1 * (profile.hi[1] - profile.lo[1])  # out, but not far
        raised, cleared = feed(det, x)
        assert not [a for _, a in raised + cleared if a["kind"] == "feature_range"], seed
        assert f"feature_range/{NAMES[1]}" in det.active
