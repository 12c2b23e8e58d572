"""The prediction-prior detector (``PriorDetector``): real's predicted class share against the
share of positives its training scores had. Each gateway process runs one per deployment on the
decisions it closes (``gateway.observability.drift_online``), apart from the feature detectors
(``rendezvous.drift_detect``) that the log bin runs on the requests it archives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rendezvous.drift_profile import change_point
from rendezvous.drift_settings import DetectorSettings
from rendezvous.drift_stats import Cusum, cusum_h


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
        self._cusum = Cusum(np.asarray(p0), np.asarray(p1), 0.0, s.clear_h)
        self._cusum.h = cusum_h(s.prior_alarms_per_100k, len(p0))
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
