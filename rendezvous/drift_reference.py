"""The training quantiles of a deployment's features as bin cuts (``FeatureReference``): what
the drift sketches count each live row against, with its out-of-distribution evidence. Pure
numpy, no I/O; the sketches themselves are ``rendezvous.drift``."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from rendezvous.drift import distance_counts
from rendezvous.ood import OodReference
from rendezvous.quantile_bins import bin_index
from rendezvous.spec import FeatureSpec


def _counted_shares(spec: FeatureSpec, bins: int) -> np.ndarray | None:
    """(features, bins) of ``FeatureStats.shares``, or None unless every feature has a
    histogram of that many bins."""
    rows = [spec.stats[name].shares for name in spec.names]
    if any(len(r) != bins for r in rows):
        return None
    shares = np.asarray(rows, dtype=np.float64)
    sums = shares.sum(axis=1)
    if not np.isfinite(shares).all() or (shares < 0).any() or (np.abs(sums - 1) > 1e-3).any():
        return None
    return shares / sums[:, None]


@dataclass(frozen=True, eq=False)
class FeatureReference:
    """Training quantiles as bin cuts, so live rows can be counted per bin and compared with
    the share of training rows each bin held."""

    names: tuple[str, ...]
    cuts: np.ndarray
    expected: np.ndarray
    ood: OodReference | None = None
    """The training range and centre: the out-of-distribution evidence of the rows."""

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> FeatureReference | None:
        """None when a feature lacks quantiles or the features use different levels.

        Each bin's expected share is the share of training rows counted in it
        (``FeatureStats.shares``) where every feature has them. Else it is read off the
        levels: a value equal to a cut goes to the upper bin, so a bin that cannot hold a
        training row (two equal cuts, or a first cut at the training minimum, as with the
        zeros of the concavity features) would always read empty, and its share moves to the
        bin above, where those tied rows land; but ties inside a bin are not seen, and a
        feature of few distinct values (pixel intensities, counts) read a PSI near 1 on its
        own training rows (found by a helper's probe).
        """
        levels: list[str] | None = None
        rows = []
        for name in spec.names:
            stats = spec.stats.get(name)
            if stats is None or not stats.quantiles:
                return None
            keys = sorted(stats.quantiles, key=float)
            if levels is None:
                levels = keys
            elif [float(k) for k in keys] != [float(k) for k in levels]:
                return None
            rows.append([stats.quantiles[k] for k in keys])
        assert levels is not None
        cuts = np.maximum.accumulate(np.asarray(rows, dtype=np.float64), axis=1)
        counted = _counted_shares(spec, cuts.shape[1] + 1)
        if counted is not None:
            expected = counted
        else:
            share = np.diff([0.0, *(float(k) for k in levels), 1.0])
            expected = np.tile(share, (len(spec.names), 1))
            for f, name in enumerate(spec.names):
                lows = [spec.stats[name].min, *cuts[f, :-1]]
                for j in range(cuts.shape[1]):
                    if cuts[f, j] <= lows[j]:  # bin j = [lows[j], cuts[j]) is empty by construction
                        expected[f, j + 1] += expected[f, j]
                        expected[f, j] = 0.0
        return cls(
            names=tuple(spec.names),
            cuts=cuts,
            expected=expected,
            ood=OodReference.from_spec(spec),
        )

    def evidence(self, matrix: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """Out-of-distribution evidence of a (rows, features) batch: how many rows have a
        feature outside the training range, how many rows each feature is outside it in, and
        the rows' distances to the training centre binned over ``DISTANCE_EDGES`` (the
        figures each decision record carries, ``rendezvous.ood``). Rows holding a NaN are
        left out, as ``bin`` does."""
        assert self.ood is not None
        x = np.asarray(matrix, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        x = x[~np.isnan(x).any(axis=1)]
        out, distance = self.ood.measure(x)
        return (
            int(out.any(axis=1).sum()),
            out.sum(axis=0).astype(np.int64),
            distance_counts(distance),
        )

    def bin(self, matrix: np.ndarray) -> np.ndarray:
        """Counts per feature and bin of a (rows, features) batch. A value equal to a cut
        counts in the bin above it; rows holding a NaN are left out."""
        x = np.asarray(matrix, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        n, k = self.cuts.shape
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"expected rows of {n} features, got shape {x.shape}")
        x = x[~np.isnan(x).any(axis=1)]
        flat = bin_index(x, self.cuts) + np.arange(n) * (k + 1)
        return np.bincount(flat.ravel(), minlength=n * (k + 1)).reshape(n, k + 1).astype(np.int64)

    @property
    def version(self) -> str:
        digest = hashlib.sha256("\x1f".join(self.names).encode())
        digest.update(np.ascontiguousarray(self.cuts, dtype="<f8").tobytes())
        return f"fr-{digest.hexdigest()[:12]}"


class FeatureReferences:
    """A ``FeatureReference`` per deployment, built again when its spec changes (compared by
    identity, then by value). Keyed by the spec's version, which names the layout only, two
    deployments of the same features shared the first one's reference whatever their own
    training statistics: one fed traffic shifted far from its own training read the PSI of
    the other and never alerted (found by a helper's probe)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[FeatureSpec, FeatureReference | None]] = {}

    def of(self, deployment: str, spec: FeatureSpec) -> FeatureReference | None:
        held = self._held.get(deployment)
        if held is None or (held[0] is not spec and held[0] != spec):
            held = (spec, FeatureReference.from_spec(spec))
        self._held[deployment] = (spec, held[1])  # the object at hand: the next look is cheap
        return held[1]

    def keep_only(self, deployments: Collection[str]) -> None:
        """Forget the deployments not among ``deployments`` (deleted): each held its spec and
        reference (tens of kB) for as long as the process ran (found by a churn probe)."""
        for gone in [d for d in self._held if d not in deployments]:
            del self._held[gone]
