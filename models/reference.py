"""The training statistics of a model's features, from rows it was not fitted on (or its
training rows): what the drift detectors, the drift monitor and the out-of-distribution score
compare live traffic against (``rendezvous.spec.FeatureSpec``), and the model's score
reference. The demo's training uses them, and so does an upload that brings reference rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from rendezvous.drift import predicted_counts, score_counts
from rendezvous.ood import OodReference
from rendezvous.quantile_bins import bin_index
from rendezvous.spec import FeatureSpec, FeatureStats, Lookup, TrainingCentre

QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""Deciles: the cuts of the feature-drift histograms. Equal-mass bins keep the PSI of a
stationary window low and steady; tail levels (0.01, 0.99) hold one or two training rows each
and made the largest of 30 feature PSIs swing up to 0.5 on unshifted traffic (tests/test_drift)."""
DISTANCE_QUANTILES = (0.5, 0.9, 0.99, 1.0)
"""Of the training rows' distances to their centre, kept to read a live distance against."""
MIN_ROWS = 50
"""Fewest reference rows: the deciles and the correlation need some."""
MAX_CORRELATED_FEATURES = 256
"""Beyond this many features the training centre keeps no correlation (the distance is the
diagonal one): its triangle grows as the square of the features and travels in every copy of
the spec, so 2,500 features made a 44 MB deployment state, read and written as JSON by every
admin call, stalling the gateway's requests (found by a helper's probe)."""


def training_stats(names: list[str], x: np.ndarray) -> dict[str, FeatureStats]:
    stats = {}
    for i, name in enumerate(names):
        # as the gateway will see the values: float32 (0.7 is 0.69999999 there; counted as
        # float64, a tie at a cut fell in the bin above in training and below it live, and a
        # training maximum of 0.3 had live 0.3 outside the range, found by a review)
        col = x[:, i].astype(np.float32).astype(np.float64)
        qs = np.quantile(col, QUANTILES)
        # the rows in each bin the deciles cut, counted as live rows are (a value at a cut in
        # the bin above): with tied values the bins hold anything but a tenth each
        cuts = np.maximum.accumulate(qs)
        counts = np.bincount(bin_index(col[:, None], cuts[None, :])[:, 0], minlength=len(qs) + 1)
        stats[name] = FeatureStats(
            mean=float(col.mean()),
            std=float(col.std()),
            min=float(col.min()),
            max=float(col.max()),
            quantiles={str(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
            shares=tuple(round(float(c) / len(col), 9) for c in counts),
            most_mass=most_mass(col),
        )
    return stats


MOST_MASS_LEVEL = 1e-6
"""How unlikely the reference rows make a larger share of one value (``most_mass``)."""


def most_mass(col: np.ndarray) -> float:
    """An upper bound on the share of rows any one value of the column holds: Clopper and
    Pearson's, one-sided at ``MOST_MASS_LEVEL``, on its most frequent value's count (the
    rows are a sample: 3 of 426 rows on one value bounds it at 5 %)."""
    from scipy.stats import beta  # sklearn's dependency; only training and uploads need it

    _, counts = np.unique(col, return_counts=True)
    k, n = int(counts.max()), len(col)
    if k >= n:
        return 1.0
    return math.ceil(float(beta.ppf(1.0 - MOST_MASS_LEVEL, k + 1, n - k)) * 1e6) / 1e6


def training_centre(
    names: list[str], x: np.ndarray, stats: dict[str, FeatureStats]
) -> TrainingCentre:
    """The shrunk correlation of the training rows as a whitening (``TrainingCentre``).
    Ledoit-Wolf rather than the sample covariance: 30 features over a few hundred rows, some
    nearly collinear (radius, perimeter, area), leave the sample covariance close to singular,
    and its inverse would make a tiny wobble of a collinear pair look like a gross outlier."""
    if len(names) > MAX_CORRELATED_FEATURES:
        rows: tuple[tuple[float, ...], ...] = ()
    else:
        rows = _whitening_rows(names, x, stats)
    draft = FeatureSpec(names=tuple(names), stats=stats, centre=TrainingCentre(rows))
    reference = OodReference.from_spec(draft)
    assert reference is not None
    _, distance = reference.measure(x)
    qs = np.quantile(distance, DISTANCE_QUANTILES)
    return TrainingCentre(
        rows, {str(q): round(float(v), 4) for q, v in zip(DISTANCE_QUANTILES, qs, strict=True)}
    )


def _whitening_rows(
    names: list[str], x: np.ndarray, stats: dict[str, FeatureStats]
) -> tuple[tuple[float, ...], ...]:
    """The whitening's lower triangle, or none (the diagonal distance) when the rows leave no
    correlation to invert: every column constant, or columns that are copies of each other
    (an upload's reference rows of that shape were a 500, found by a fuzzing probe)."""
    mean = np.asarray([stats[n].mean for n in names])
    spread = np.asarray([stats[n].std > 0 for n in names])
    std = np.where(spread, [stats[n].std for n in names], 1.0)
    z = (np.asarray(x, dtype=np.float64) - mean) / std
    correlation = LedoitWolf(assume_centered=True).fit(z).covariance_
    # a constant column correlates with nothing: its own unit variance, as in the diagonal
    correlation[~spread, :] = 0.0
    correlation[:, ~spread] = 0.0
    correlation[~spread, ~spread] = 1.0
    try:
        whitening = np.linalg.inv(np.linalg.cholesky(correlation))  # lower triangular
    except np.linalg.LinAlgError:
        return ()
    if not np.isfinite(whitening).all():
        return ()
    return tuple(tuple(float(f"{v:.7g}") for v in whitening[i, : i + 1]) for i in range(len(names)))


def training_spec(names: list[str], x: np.ndarray, lookup: Lookup | None = None) -> FeatureSpec:
    """A spec with every training statistic the drift checks and the OOD score read."""
    stats = training_stats(names, x)
    centre = training_centre(names, x, stats)
    return FeatureSpec(names=tuple(names), stats=stats, lookup=lookup, centre=centre)


def scores_reference(positive_scores: Any) -> list[float]:
    """Share of the scores in each of the ten score bins."""
    counts = score_counts(np.asarray(positive_scores, dtype=np.float64))
    return [float(c) / float(counts.sum()) for c in counts]


def prediction_references(probabilities: Any) -> dict[str, list[float]]:
    """The ``score_reference`` of (rows, classes) probabilities and, with three classes or
    more, their ``class_reference``, as ``rendezvous.drift.predicted_counts`` counts live rows:
    the score drift and the class drift then compare like with like."""
    proba = np.asarray(probabilities, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] < 2 or not len(proba):
        raise ValueError(f"expected (rows, classes) probabilities, got shape {proba.shape}")
    if proba.shape[1] == 2:
        return {"score_reference": scores_reference(proba[:, 1])}
    top, counts = predicted_counts(proba)
    return {
        "score_reference": scores_reference(top),
        "class_reference": [float(c) / float(counts.sum()) for c in counts],
    }
